"""Packing real token arrays: Arrow lists of documents in, Arrow lists of sequences out.

This is what a Spark task calls on its partition: the layout is computed from
the document lengths, then every token is copied once, straight into its place
in the output buffer. The result shares no memory with the input.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from bfpack_spark.packing._jit import copy_range, jit
from bfpack_spark.packing.layout import Layout, make_layout

TokenLists = pa.Array | pa.ChunkedArray | Iterable[Iterable[int]]

@jit
def _gather(values, doc_offsets, seg_doc, seg_start, seg_len, out):
    pos = 0
    for j in range(seg_doc.shape[0]):
        n = seg_len[j]
        copy_range(out, pos, values, doc_offsets[seg_doc[j]] + seg_start[j], n)
        pos += n


def flatten_token_lists(tokens: TokenLists) -> tuple[np.ndarray, npt.NDArray[np.int64]]:
    """The flat token buffer and per-document offsets into it (``n_docs + 1`` of them).

    Accepts ``list``/``large_list`` Arrow arrays or chunked arrays of an integer
    type; a single array is not copied, several are concatenated. Null documents
    or null tokens raise ``ValueError``.
    """
    if not isinstance(tokens, (pa.Array, pa.ChunkedArray)):
        tokens = pa.array(tokens, type=pa.list_(pa.int32()))
    chunks = tokens.chunks if isinstance(tokens, pa.ChunkedArray) else [tokens]
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    n_docs = 0
    for chunk in chunks:
        if not (pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type)):
            raise ValueError(f"tokens must be an Arrow list or large_list array, got {chunk.type}")
        if not pa.types.is_integer(chunk.type.value_type):
            raise ValueError(f"token ids must be integers, got {chunk.type.value_type}")
        if chunk.null_count:
            bad = int(np.flatnonzero(chunk.is_null().to_numpy(zero_copy_only=False))[0])
            raise ValueError(f"document {n_docs + bad} is null; drop or reject it before packing")
        offsets = chunk.offsets.to_numpy().astype(np.int64)
        child = chunk.values
        if child.null_count and chunk.flatten().null_count:
            raise ValueError("token lists must not contain null token ids")
        parts.append((child.to_numpy(zero_copy_only=False), offsets))
        n_docs += len(chunk)
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return np.empty(0, np.int32), np.zeros(1, np.int64)
    values, offsets, base = [], [], 0
    for child_values, chunk_offsets in parts:
        values.append(child_values[chunk_offsets[0]:chunk_offsets[-1]])
        offsets.append(chunk_offsets[:-1] - chunk_offsets[0] + base)
        base += int(chunk_offsets[-1] - chunk_offsets[0])
    offsets.append(np.array([base], np.int64))
    return np.concatenate(values), np.concatenate(offsets)


def list_array(offsets: np.ndarray, values: pa.Array) -> pa.Array:
    """A ``list`` array, or ``large_list`` when the values overflow 32-bit offsets."""
    if offsets[-1] < 2**31:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)
    return pa.LargeListArray.from_arrays(pa.array(offsets), values)


@jit
def _gather_at(values, doc_offsets, seg_doc, seg_start, seg_len, seg_out, out):
    for j in range(seg_doc.shape[0]):
        copy_range(out, seg_out[j], values, doc_offsets[seg_doc[j]] + seg_start[j], seg_len[j])


class ChunkedTokens:
    """Token lists spread over several Arrow chunks (as read back from a file), used where they are.

    Concatenating the chunks would copy every token once more; here a segment is copied
    straight from its chunk to its place in the output.
    """

    def __init__(self, tokens: pa.Array | pa.ChunkedArray):
        chunks = tokens.chunks if isinstance(tokens, pa.ChunkedArray) else [tokens]
        self._parts = [flatten_token_lists(c) for c in chunks if len(c)]  # no copy of the values
        counts = [offsets.shape[0] - 1 for _, offsets in self._parts]
        self._first = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        self.lengths = (np.concatenate([np.diff(o) for _, o in self._parts]) if self._parts
                        else np.zeros(0, np.int64))

    def gather(self, doc: np.ndarray, start: np.ndarray, length: np.ndarray) -> np.ndarray:
        """The tokens of the given segments (document, start, length), one after the other."""
        length = np.asarray(length, np.int64)
        out = np.empty(int(length.sum()), np.int32)
        at = np.cumsum(length) - length
        part = np.searchsorted(self._first, doc, side="right") - 1
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(len(self._parts) + 1))
        for p, (values, offsets) in enumerate(self._parts):
            sel = order[bounds[p]:bounds[p + 1]]
            if sel.size:
                _gather_at(values, offsets, doc[sel] - self._first[p], np.asarray(start)[sel], length[sel],
                           at[sel], out)
        return out

    def head(self, doc: int, n: int) -> np.ndarray:
        """The first ``n`` tokens of one document."""
        p = int(np.searchsorted(self._first, doc, side="right") - 1)
        values, offsets = self._parts[p]
        at = offsets[doc - self._first[p]]
        return values[at:min(at + n, offsets[doc - self._first[p] + 1])]


def gather_segments(values: np.ndarray, doc_offsets: np.ndarray, doc: np.ndarray, start: np.ndarray,
                    length: np.ndarray) -> np.ndarray:
    """The tokens of the given segments, one after the other (one copy of each token)."""
    out = np.empty(int(length.sum()), dtype=values.dtype)
    _gather(values, doc_offsets, doc, start, length, out)
    return out


def sequences_table(seg_offsets: np.ndarray, tokens: np.ndarray, seg_docs: pa.Array,
                    seg_starts: np.ndarray, seg_lengths: np.ndarray, docs_column: str = "seg_docs") -> pa.Table:
    """One row per sequence from its segments (in order) and their concatenated tokens.

    Columns: ``input_ids``, ``docs_column`` (each segment's document), ``seg_starts``
    (its token offset in the document), ``seg_lengths``, ``n_tokens``.
    """
    token_offsets = np.concatenate(([0], np.cumsum(seg_lengths)))[seg_offsets]
    return pa.table({
        "input_ids": list_array(token_offsets, pa.array(tokens)),
        docs_column: list_array(seg_offsets, seg_docs),
        "seg_starts": list_array(seg_offsets, pa.array(np.asarray(seg_starts).astype(np.int32))),
        "seg_lengths": list_array(seg_offsets, pa.array(np.asarray(seg_lengths).astype(np.int32))),
        "n_tokens": pa.array(np.diff(token_offsets).astype(np.int32)),
    })


def assemble(tokens: TokenLists, layout: Layout) -> pa.Table:
    """Materialize ``layout`` over real tokens: one row per sequence.

    Columns: ``input_ids`` (the tokens, unpadded), ``seg_docs`` (index of each
    segment's document in ``tokens``), ``seg_starts`` (its token offset within the
    document), ``seg_lengths``, ``n_tokens``.
    """
    return _assemble_flat(*flatten_token_lists(tokens), layout)


def _assemble_flat(values: np.ndarray, doc_offsets: np.ndarray, layout: Layout) -> pa.Table:
    out = gather_segments(values, doc_offsets, layout.doc, layout.start, layout.length)
    return sequences_table(layout.seg_offsets, out, pa.array(layout.doc), layout.start, layout.length)


def pack_token_lists(tokens: TokenLists, seq_len: int, strategy: str = "bfd") -> pa.Table:
    """Pack tokenized documents into sequences of at most ``seq_len`` tokens.

    ``strategy="bfd"`` is best-fit packing; ``"concat"`` is the concatenate-and-cut
    baseline. Returns the table described in :func:`assemble`, sequences in the
    order the strategy opened them.
    """
    values, doc_offsets = flatten_token_lists(tokens)
    layout = make_layout(np.diff(doc_offsets), seq_len, strategy)
    return _assemble_flat(values, doc_offsets, layout)
