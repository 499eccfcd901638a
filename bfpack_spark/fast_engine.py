"""The fast tokenizer engine: gigatoken, admitted only where tests/test_tokenizer_engine.py proved its ids
equal to the reference's (tiktoken, or HF ``tokenizers`` for a ``tokenizer.json``): the tiktoken rank
files and the ``tokenizer.json`` shapes listed here, with the gigatoken version pinned. What the engine
must not see goes to the reference (see :class:`FastEncoder`); :func:`why_reference` says why a
tokenizer has no fast engine.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

#: The fast engine and the one version of it whose ids the tests proved; another version is not used.
FAST_ENGINE, FAST_ENGINE_VERSION = "gigatoken", "0.10.0"

#: tiktoken rank files the fast engine is proven on: sha256 of the ranks (as a .tiktoken file) ->
#: (the encoding's split regex, gigatoken's name for that regex). cl100k_base: the default.
_PROVEN_TIKTOKEN = {
    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7": (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
        r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
        "gpt4"),
}

#: tokenizer.json structures the fast engine is proven on (sha256 of :func:`hf_structure`: the
#: pre-tokenizer and the BPE model's settings, as HF tokenizers writes them back), by family.
_PROVEN_HF = {
    "db45eed3dd8492436f6b11de48083967b4a1c88eb8a476bee99a05334680628d": "Llama 3",
    "12cef3a48c0d5ea3abf2b3a18e780abfd37c74e8ea20e376e21ad3ff5052f7a7": "GPT-2",
    "d53e3ffbb72abcbd6f903e3a8968cecf1ce6c3a5ed410ad42bc896353bc9ab5c": "Qwen2, Qwen2.5, Qwen3",
    "0a94c75abe43f6e0b4466b8a4ef4967deabd61c8421eaf39f055e301e3f41fa8": "GPT-NeoX, Pythia, OLMo 1",
    "c84b9552520a74a22fe3b1dca58f65d21f0796aa41a69246e4485d9eec470a68": "Mistral Tekken",
}
#: Normalizers the fast path takes: HF tokenizers' own normalizer runs first (on the texts that are not
#: ASCII, which no normalizer here changes), then the fast engine on what it made, as the reference would.
_NORMALIZERS = (None, "NFC", "NFKC")

#: A fast encoder is made anew once its process has grown this much since it was made:
#: gigatoken 0.10 caches every distinct pre-token it meets, without bound.
_CACHE_BUDGET = 512 * 2**20


def _rss() -> int:
    """This process's resident memory in bytes (Linux; 0 elsewhere, where no encoder is renewed)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class FastEncoder:
    """gigatoken's encoder of one tokenizer, and the strings it must not see.

    gigatoken always reads a special token's characters as that token, where the reference reads
    them as text: documents holding one (``specials``) go to the reference. Its caches grow with
    every distinct pre-token (1.9 GB over 300 MB of random words, measured): once the process has
    grown ``budget`` bytes since the encoder was made, it is made anew from the vocabulary.
    """

    def __init__(self, load: Callable[[], object], specials: Sequence[str], budget: int = _CACHE_BUDGET,
                 normalize: Callable[[str], str] | None = None):
        self._load = load
        self.specials = tuple(specials)
        self._normalize = normalize
        self._budget = budget
        self._backend: Any = None  # made on the first text: a run over token ids never needs it
        self._baseline = 0
        self.renewals = -1

    def _renew(self) -> None:
        self._backend = None  # freed before its successor is built
        self._backend = self._load()
        self._baseline = _rss()
        self.renewals += 1

    def prepared(self, texts: Sequence[str]) -> list[str]:
        """The texts as the engine must read them: normalized by the tokenizer's own normalizer (the
        reference's code) where it has one; ASCII, which NFC and NFKC leave as it is, as it is."""
        if self._normalize is None:
            return list(texts)
        return [t if t.isascii() else self._normalize(t) for t in texts]

    def encode(self, texts: list[str], threads: int) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, ids) of ``texts``: int64 offsets into one int32 array."""
        if self._backend is None:
            self._renew()
        out = self._backend.encode_batch(texts, parallel=threads > 1)
        offsets = np.asarray(out.layout.offsets.data)
        ids = np.asarray(out.layout.content.data).view(np.int32)  # uint32 ids, all below 2**31
        if _rss() >= self._baseline + self._budget:
            self._backend = None  # freed now; its successor is made for the next texts, if any come
        return offsets, ids


def _fast_module():
    """gigatoken, where the proven version is installed; else None."""
    try:
        from importlib.metadata import version

        import gigatoken
    except ImportError:
        return None
    return gigatoken if version(FAST_ENGINE) == FAST_ENGINE_VERSION else None


def why_reference(engine: str, uncovered: str) -> str:
    """Why the reference encodes everything: ``--tokenizer-engine reference``, the fast engine not
    installed, or ``uncovered`` (what of the tokenizer its proofs do not cover)."""
    if engine == "reference":
        return "--tokenizer-engine reference"
    if _fast_module() is None:
        pinned = f"{FAST_ENGINE}=={FAST_ENGINE_VERSION}"
        return f"{pinned} is not installed (pip install '{pinned}')"
    return uncovered


def hf_shape(data: str) -> str:
    """A tokenizer.json's normalizer, pre-tokenizer and model in a few words (``normalizer NFKC,
    pre-tokenizer Sequence[Split, ByteLevel], model BPE``): what the fast engine's proofs are about."""
    def kind(part: dict | None) -> str:
        if not part:
            return "none"
        inner = part.get("normalizers") or part.get("pretokenizers")
        return f"{part.get('type')}[{', '.join(kind(p) for p in inner)}]" if inner else str(part.get("type"))

    config = json.loads(data)
    return (f"normalizer {kind(config.get('normalizer'))}, pre-tokenizer {kind(config.get('pre_tokenizer'))}, "
            f"model {kind(config.get('model'))}")


def tiktoken_ranks(enc) -> bytes:
    """An encoding's mergeable ranks as the text of a .tiktoken file (the form OpenAI publishes them in)."""
    ranks = sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1])
    return b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ranks)


def tiktoken_fast(enc) -> FastEncoder | None:
    """The fast engine for a tiktoken encoding whose ranks and regex are proven, else None."""
    gigatoken = _fast_module()
    ranks = tiktoken_ranks(enc)
    proven = _PROVEN_TIKTOKEN.get(hashlib.sha256(ranks).hexdigest())
    if gigatoken is None or proven is None or proven[0] != enc._pat_str:
        return None
    return FastEncoder(functools.partial(_gigatoken_from_ranks, gigatoken, ranks, proven[1], enc._special_tokens),
                       list(enc._special_tokens))


def _gigatoken_from_ranks(gigatoken, ranks: bytes, regex: str, specials: dict[str, int]):
    fd, path = tempfile.mkstemp(suffix=".tiktoken")  # gigatoken reads ranks from a file only
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(ranks)
        return gigatoken.gigatoken_rs.BPETokenizer.from_tiktoken(path, regex, specials)
    finally:
        os.remove(path)


def hf_structure(data: str | dict) -> str:
    """sha256 of what decides how a tokenizer.json splits and merges text (its normalizer, vocabulary and
    merges aside): the pre-tokenizer and the model's settings. ``data`` as HF tokenizers writes it back
    (``Tokenizer.to_str()``: every setting present), without what cannot change an id (ByteLevel's
    ``trim_offsets``; an empty subword prefix or suffix is none); ``data`` parsed already, or not."""
    config = json.loads(data) if isinstance(data, str) else data

    def ids_only(part):
        if isinstance(part, dict):
            return {k: ids_only(v) for k, v in part.items() if not (k == "trim_offsets" or
                                                                     (k.endswith(("_prefix", "_suffix")) and not v))}
        return [ids_only(p) for p in part] if isinstance(part, list) else part

    model = {k: v for k, v in (config.get("model") or {}).items() if k not in ("vocab", "merges")}
    shape = {"pre_tokenizer": ids_only(config.get("pre_tokenizer")), "model": ids_only(model)}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()


def hf_fast(tok) -> FastEncoder | None:
    """The fast engine for a tokenizer.json of a proven structure and normalizer, else None."""
    gigatoken = _fast_module()
    if gigatoken is None:
        return None
    config = json.loads(tok.to_str())
    normalizer = config.get("normalizer")
    if hf_structure(config) not in _PROVEN_HF or (normalizer or {}).get("type") not in _NORMALIZERS:
        return None
    config["normalizer"] = None  # HF's own runs first (FastEncoder.prepared)
    added = [t.content for t in tok.get_added_tokens_decoder().values()]  # the reference splits on all of them
    return FastEncoder(functools.partial(gigatoken.gigatoken_rs.load_hf_json, json.dumps(config)), added,
                       normalize=tok.normalizer.normalize_str if normalizer else None)
