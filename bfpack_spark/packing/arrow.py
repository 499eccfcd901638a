"""Packing real token arrays: Arrow lists of documents in, Arrow lists of sequences out.

This is what a Spark task calls on its partition: the layout is computed from
the document lengths, then every token is copied once, straight into its place
in the output buffer. The result shares no memory with the input.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeAlias

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from bfpack_spark.packing._jit import copy_range, jit
from bfpack_spark.packing.layout import Layout, make_layout

TokenLists: TypeAlias = pa.Array | pa.ChunkedArray | Iterable[Iterable[int]]

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


def ids_as_binary(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    """Each list ``values[offsets[i]:offsets[i + 1]]`` as one binary value holding its bytes, without
    a copy. Spark moves a binary column between Python and its JVM as whole buffers, a list column
    element by element (a shuffle of moved segments costs about a third less this way)."""
    values = np.ascontiguousarray(values)
    byte_offsets = offsets.astype(np.int64) * values.dtype.itemsize
    if byte_offsets[-1] - byte_offsets[0] >= 2**31:
        raise ValueError(f"{byte_offsets[-1] - byte_offsets[0]:,} bytes of numbers in one binary array: Spark's "
                         f"binary columns hold at most 2 GiB per batch; hand them over in slices")
    return pa.Array.from_buffers(pa.binary(), len(offsets) - 1, [
        None, pa.py_buffer((byte_offsets - byte_offsets[0]).astype(np.int32)),
        pa.py_buffer(values[offsets[0]:offsets[-1]])])


def binary_as_ids(column: pa.Array | pa.ChunkedArray, dtype: npt.DTypeLike) -> tuple[np.ndarray, npt.NDArray[np.int64]]:
    """The inverse of :func:`ids_as_binary`: the values of every row, concatenated, and the rows'
    offsets into them (``len(column) + 1``). Rows must not be null."""
    column = column.cast(pa.large_binary())
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], pa.large_binary())
    if column.null_count:
        raise ValueError("a null where a list of numbers was expected")
    _, offsets_buffer, data = column.buffers()
    offsets = np.frombuffer(offsets_buffer, np.int64)[column.offset:column.offset + len(column) + 1]
    raw = np.frombuffer(data, np.uint8)[offsets[0]:offsets[-1]] if data is not None else np.empty(0, np.uint8)
    itemsize = np.dtype(dtype).itemsize
    return raw.view(dtype), (offsets - offsets[0]) // itemsize


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
        out = np.empty(int(length.sum()), self._parts[0][0].dtype if self._parts else np.int32)
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


@jit
def _frame(values, offsets, mask_values, new_offsets, bos, eos, out, mask_out):
    """Each document's tokens between ``bos`` and ``eos`` (-1: none); with masks (``mask_out``
    not empty), BOS gets 0 and EOS the mask of the document's last token (1 when it has none)."""
    with_masks = mask_out.shape[0] > 0
    given = mask_values.shape[0] > 0
    for i in range(offsets.shape[0] - 1):
        pos = new_offsets[i]
        n = offsets[i + 1] - offsets[i]
        if bos >= 0:
            out[pos] = bos
            if with_masks:
                mask_out[pos] = 0
            pos += 1
        copy_range(out, pos, values, offsets[i], n)
        if with_masks:
            if given:
                copy_range(mask_out, pos, mask_values, offsets[i], n)
            else:
                mask_out[pos:pos + n] = 1
        pos += n
        if eos >= 0:
            out[pos] = eos
            if with_masks:
                mask_out[pos] = mask_values[offsets[i + 1] - 1] if given and n > 0 else 1


def frame_documents(tokens: pa.Array, masks: pa.Array | None, bos: int | None, eos: int | None,
                    with_masks: bool = False) -> tuple[pa.ListArray, pa.ListArray | None]:
    """Documents with ``bos`` put before and ``eos`` after each (either may be None), and their
    loss masks (``list<int8>``: given, or all 1 when ``with_masks`` and none given; BOS 0, EOS the
    mask of the document's last token). Tokens become ``list<int32>``; every token is copied once."""
    values, offsets = flatten_token_lists(tokens)
    values, offsets = values[offsets[0]:offsets[-1]].astype(np.int32, copy=False), offsets - offsets[0]
    extra = (bos is not None) + (eos is not None)
    new_offsets = offsets + extra * np.arange(offsets.shape[0], dtype=np.int64)
    out = np.empty(int(new_offsets[-1]), np.int32)
    mask_values = np.empty(0, np.int8)
    if masks is not None:
        mask_values, mask_offsets = flatten_token_lists(masks)
        mask_values = mask_values[mask_offsets[0]:mask_offsets[-1]].astype(np.int8, copy=False)
        if not np.array_equal(mask_offsets - mask_offsets[0], offsets):
            raise ValueError("every loss mask must be as long as its document's tokens")
    with_masks = with_masks or masks is not None
    mask_out = np.empty(out.shape[0] if with_masks else 0, np.int8)
    _frame(values, offsets, mask_values, new_offsets, -1 if bos is None else bos, -1 if eos is None else eos,
           out, mask_out)
    framed_masks = list_array(new_offsets, pa.array(mask_out)) if with_masks else None
    return list_array(new_offsets, pa.array(out)), framed_masks


@jit
def _join_pairs(a_values, a_offsets, b_values, b_offsets, out, mask_out):
    pos = 0
    for i in range(a_offsets.shape[0] - 1):
        n = a_offsets[i + 1] - a_offsets[i]
        copy_range(out, pos, a_values, a_offsets[i], n)
        mask_out[pos:pos + n] = 0
        pos += n
        n = b_offsets[i + 1] - b_offsets[i]
        copy_range(out, pos, b_values, b_offsets[i], n)
        mask_out[pos:pos + n] = 1
        pos += n


def prompt_and_text(prompts: pa.Array, texts: pa.Array) -> tuple[pa.ListArray, pa.ListArray]:
    """Each document as its prompt's tokens, then its text's; the loss mask is 0 on the prompt."""
    a_values, a_offsets = flatten_token_lists(prompts)
    b_values, b_offsets = flatten_token_lists(texts)
    offsets = (a_offsets - a_offsets[0]) + (b_offsets - b_offsets[0])
    out = np.empty(int(offsets[-1]), np.int32)
    mask_out = np.empty(out.shape[0], np.int8)
    _join_pairs(a_values, a_offsets, b_values, b_offsets, out, mask_out)
    return list_array(offsets, pa.array(out)), list_array(offsets, pa.array(mask_out))


def gather_segments(values: np.ndarray, doc_offsets: np.ndarray, doc: np.ndarray, start: np.ndarray,
                    length: np.ndarray) -> np.ndarray:
    """The tokens of the given segments, one after the other (one copy of each token)."""
    out = np.empty(int(length.sum()), dtype=values.dtype)
    _gather(values, doc_offsets, doc, start, length, out)
    return out


def sequences_table(seg_offsets: np.ndarray, tokens: np.ndarray, seg_docs: pa.Array,
                    seg_starts: np.ndarray, seg_lengths: np.ndarray, *, docs_column: str = "seg_docs",
                    loss_mask: np.ndarray | None = None) -> pa.Table:
    """One row per sequence from its segments (in order) and their concatenated tokens.

    Columns: ``input_ids``, ``docs_column`` (each segment's document), ``seg_starts``
    (its token offset in the document), ``seg_lengths``, ``n_tokens``; and ``loss_mask``
    (int8, aligned with ``input_ids``) when the segments' masks are given, laid out as ``tokens``.
    """
    token_offsets = np.concatenate(([0], np.cumsum(seg_lengths)))[seg_offsets]
    columns = {
        "input_ids": list_array(token_offsets, pa.array(tokens)),
        docs_column: list_array(seg_offsets, seg_docs),
        "seg_starts": list_array(seg_offsets, pa.array(np.asarray(seg_starts).astype(np.int32))),
        "seg_lengths": list_array(seg_offsets, pa.array(np.asarray(seg_lengths).astype(np.int32))),
        "n_tokens": pa.array(np.diff(token_offsets).astype(np.int32)),
    }
    if loss_mask is not None:
        columns["loss_mask"] = list_array(token_offsets, pa.array(loss_mask.astype(np.int8, copy=False)))
    return pa.table(columns)


def layout_sequences(tokens: TokenLists, layout: Layout) -> pa.Table:
    """Materialize ``layout`` over real tokens: one row per sequence.

    Columns: ``input_ids`` (the tokens, unpadded), ``seg_docs`` (index of each
    segment's document in ``tokens``), ``seg_starts`` (its token offset within the
    document), ``seg_lengths``, ``n_tokens``.
    """
    return _assemble_flat(*flatten_token_lists(tokens), layout)


def _assemble_flat(values: np.ndarray, doc_offsets: np.ndarray, layout: Layout) -> pa.Table:
    out = gather_segments(values, doc_offsets, layout.doc, layout.start, layout.length)
    return sequences_table(layout.seg_offsets, out, pa.array(layout.doc), layout.start, layout.length)


def pack_token_lists(tokens: TokenLists, seq_len: int, strategy: str = "bfd",
                     max_segments: int | None = None) -> pa.Table:
    """Pack tokenized documents into sequences of at most ``seq_len`` tokens (and at most
    ``max_segments`` segments, when given).

    ``strategy="bfd"`` is best-fit packing; ``"concat"`` is the concatenate-and-cut
    baseline. Returns the table described in :func:`layout_sequences`, sequences in the
    order the strategy opened them.
    """
    values, doc_offsets = flatten_token_lists(tokens)
    layout = make_layout(np.diff(doc_offsets), seq_len, strategy, max_segments)
    return _assemble_flat(values, doc_offsets, layout)
