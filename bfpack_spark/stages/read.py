"""Stage 1: one group of input splits in, chunk rows and reject rows out.

Reads every split of the group, tokenizes texts (or checks given token ids), adds
the end-of-document token, and cuts each document into chunks of at most
``seq_len`` tokens, each chunk one row. Documents never exceed ``seq_len`` in a row
that Spark has to handle, however large they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bfpack_spark import faults
from bfpack_spark.io.inputs import Split
from bfpack_spark.io.readers import RawBatch, Reject, read_split
from bfpack_spark.packing import chunk_documents, flatten_token_lists
from bfpack_spark.schemas import CHUNK, COUNT, READ, REJECT
from bfpack_spark.tokenize import Tokenizer, encode_texts, load_tokenizer


@dataclass(frozen=True)
class ReadSettings:
    """What stage 1 needs to know; small and picklable, shipped to every task."""

    id_column: str | None
    column: str
    tokenized: bool
    tokenizer: str
    eos_token: str | None
    append_eos: bool
    seq_len: int
    keep_empty: bool
    max_document_bytes: int


def _append_token(tokens: pa.Array, token: int) -> pa.ListArray:
    """Each list with ``token`` added at its end."""
    values, offsets = _flat(tokens)
    n = offsets.shape[0] - 1
    lengths = np.diff(offsets)
    out = np.empty(values.shape[0] + n, dtype=np.int32)
    new_offsets = np.concatenate(([0], np.cumsum(lengths + 1)))
    out[np.arange(values.shape[0]) + np.repeat(np.arange(n), lengths)] = values
    out[new_offsets[1:] - 1] = token
    return pa.ListArray.from_arrays(pa.array(new_offsets.astype(np.int32)), pa.array(out))


def _flat(tokens: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The token buffer of these lists alone, and offsets into it from 0."""
    values, offsets = flatten_token_lists(tokens)
    return values[offsets[0]:offsets[-1]], offsets - offsets[0]


def _check_token_ids(raw: RawBatch, tokenizer: Tokenizer) -> None:
    """Reject documents holding an id that is not a token of the tokenizer; the rest become list<int32>."""
    if not raw.rows:
        return
    values, offsets = _flat(raw.tokens)
    known = tokenizer.known_ids
    bad_values = (values < 0) | (values >= known.shape[0])
    if not known.all():  # gaps (cl100k_base: 16, all above 100,255): look up only the ids that reach them
        maybe = np.flatnonzero((values >= np.argmin(known)) & ~bad_values)
        bad_values[maybe] = ~known[values[maybe]]
    if bad_values.any():
        parents = np.searchsorted(offsets, np.flatnonzero(bad_values), side="right") - 1
        first_bad = {}
        for pos, doc in zip(np.flatnonzero(bad_values), parents):
            first_bad.setdefault(int(doc), int(values[pos]))
        mask = np.zeros(len(raw.rows), bool)
        mask[list(first_bad)] = True
        gaps = known.shape[0] - int(known.sum())
        vocabulary = f"ids 0..{known.shape[0] - 1}" + (f" but {gaps} unassigned" if gaps else "")
        _reject_where(raw, mask, [
            f"token id {first_bad[d]} is outside the vocabulary of {tokenizer.name} ({vocabulary}); "
            f"set --tokenizer to the tokenizer that made these ids" for d in sorted(first_bad)])
    values, offsets = _flat(raw.tokens)
    raw.tokens = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                          pa.array(values.astype(np.int32, copy=False)))


def _count_row(group: int, n_records: int) -> pa.RecordBatch:
    table = {name: pa.nulls(1, f.type) for name, f in zip(READ.names, READ)}
    table.update(kind=pa.array([COUNT], pa.int8()), group=pa.array([group], pa.int32()),
                 row=pa.array([n_records], pa.int64()))
    return pa.RecordBatch.from_pydict(table, schema=READ)


def _reject_rows(group: int, rejects: list[Reject]) -> pa.RecordBatch:
    n = len(rejects)
    return pa.RecordBatch.from_pydict({
        "kind": pa.array([REJECT] * n, pa.int8()),
        "group": pa.array([group] * n, pa.int32()),
        "doc_index": pa.nulls(n, pa.int64()),
        "chunk": pa.nulls(n, pa.int32()),
        "doc_id": pa.array([r.doc_id for r in rejects], pa.string()),
        "doc_tokens": pa.nulls(n, pa.int64()),
        "tokens": pa.nulls(n, pa.list_(pa.int32())),
        "source": pa.array([r.source for r in rejects], pa.string()),
        "row": pa.array([r.row for r in rejects], pa.int64()),
        "reason": pa.array([r.reason for r in rejects], pa.string()),
        "excerpt": pa.array([r.excerpt for r in rejects], pa.string()),
    }, schema=READ)


def _chunk_rows(group: int, first_doc: int, source: str, raw: RawBatch, tokens: pa.ListArray,
                seq_len: int) -> pa.RecordBatch:
    values, offsets = _flat(tokens)
    lengths = np.diff(offsets)
    chunks = chunk_documents(lengths, seq_len)
    n = len(chunks)
    chunk_offsets = np.concatenate(([0], np.cumsum(chunks.length))).astype(np.int32)
    take = pa.array(chunks.doc)
    return pa.RecordBatch.from_pydict({
        "kind": pa.array(np.full(n, CHUNK, np.int8)),
        "group": pa.array(np.full(n, group, np.int32)),
        "doc_index": pa.array(first_doc + chunks.doc),
        "chunk": pa.array(chunks.index.astype(np.int32)),
        "doc_id": pa.array(raw.ids, pa.string()).take(take),
        "doc_tokens": pa.array(lengths[chunks.doc]),
        "tokens": pa.ListArray.from_arrays(pa.array(chunk_offsets), pa.array(values.astype(np.int32, copy=False))),
        "source": pa.array([source] * n, pa.string()),
        "row": pa.array(np.asarray(raw.rows, np.int64)[chunks.doc]),
        "reason": pa.nulls(n, pa.string()),
        "excerpt": pa.nulls(n, pa.string()),
    }, schema=READ)


def read_group(group: int, splits: list[Split], settings: ReadSettings) -> Iterator[pa.RecordBatch]:
    """Chunk rows of every document of the group (in canonical order), its reject rows, and
    one count row: how many records the readers consumed, for the audit."""
    faults.check("read")
    tokenizer = load_tokenizer(settings.tokenizer, settings.eos_token)
    doc_index = n_records = 0
    for split in splits:
        for raw in read_split(split, settings.id_column, settings.column, settings.tokenized,
                              settings.max_document_bytes):
            n_records += raw.n_records
            if not settings.keep_empty:
                _reject_where(raw, _lengths(raw) == 0, "empty document (quality.empty_documents: skip)")
            if settings.tokenized:
                _check_token_ids(raw, tokenizer)
                if settings.append_eos and raw.rows:
                    raw.tokens = _append_token(raw.tokens, tokenizer.eos_id)
            elif raw.rows:
                raw.tokens, raw.texts = encode_texts(tokenizer, raw.texts, settings.append_eos), []
            _reject_where(raw, _lengths(raw) == 0, "no tokens: the tokenizer made nothing of this text")
            if raw.rejects:
                for r in raw.rejects:
                    r.source = split.source
                yield _reject_rows(group, raw.rejects)
            if raw.rows:
                yield _chunk_rows(group, doc_index, split.source, raw, raw.tokens, settings.seq_len)
                doc_index += len(raw.rows)
    yield _count_row(group, n_records)


def _lengths(raw: RawBatch) -> np.ndarray:
    if raw.tokens is not None:
        return pc.list_value_length(raw.tokens).to_numpy(zero_copy_only=False)
    return np.fromiter((len(t) for t in raw.texts), np.int64, len(raw.texts))


def _reject_where(raw: RawBatch, mask: np.ndarray, reason: str | list[str]) -> None:
    """Move the documents selected by ``mask`` from the batch to its rejects."""
    if not mask.any():
        return
    bad = np.flatnonzero(mask)
    reasons = reason if isinstance(reason, list) else [reason] * bad.shape[0]
    for i, why in zip(bad, reasons):
        raw.rejects.append(Reject("", raw.rows[i], why, "", raw.ids[i]))
    keep = ~mask
    raw.rows = [r for r, k in zip(raw.rows, keep) if k]
    raw.ids = [d for d, k in zip(raw.ids, keep) if k]
    if raw.tokens is not None:
        raw.tokens = raw.tokens.filter(pa.array(keep))
    if raw.texts:
        raw.texts = [t for t, k in zip(raw.texts, keep) if k]
