"""Figures: what each task that writes a table file computes over exactly the arrays it hands to
the Parquet writer (:func:`sequence_figures`, :func:`document_figures`), and how several files'
figures add up (:func:`add_figures`). The staging area sums them as files land and the audit holds
the sums against what the read stage counted and the plan decided.

Per-document conservation uses order-free checksums (sums modulo 2^64 of a 64-bit hash):
of (document id x its token count) on both sides, and of (document id, chunk start) on
both sides, so every document's tokens and every chunk appear exactly once, up to hash
collisions. Loss masks, where a run has them, are checked the same way, token by token: a
sum over every (document id, token position) whose mask is 1, from the documents' masks as
read and from the masks the sequences carry.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import zip_longest

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bfpack_spark.packing._jit import jit

MOD = 2**64
_CHECKSUMS = ("doc_lengths", "doc_starts", "id_sum", "id_square_sum", "loss_positions")
_POSITION = np.uint64(0xD6E8FEB86659FD93)


@jit
def _mix(h):
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


@jit
def _string_hashes(offsets, data):
    out = np.empty(offsets.shape[0] - 1, np.uint64)
    for i in range(out.shape[0]):
        h = np.uint64(0xCBF29CE484222325)
        for j in range(offsets[i], offsets[i + 1]):
            h = (h ^ np.uint64(data[j])) * np.uint64(0x100000001B3)
        out[i] = _mix(h)
    return out


@jit
def _weighted_sum(hashes, weights):
    total = np.uint64(0)
    for i in range(hashes.shape[0]):
        total += hashes[i] * np.uint64(weights[i])
    return total


@jit
def _start_sum(hashes, starts):
    total = np.uint64(0)
    for i in range(hashes.shape[0]):
        total += _mix(hashes[i] ^ (np.uint64(starts[i]) * np.uint64(0x9E3779B97F4A7C15)))
    return total


@jit
def _chunk_start_sum(hashes, n_chunks, seq_len):
    total = np.uint64(0)
    for i in range(hashes.shape[0]):
        for k in range(n_chunks[i]):
            total += _mix(hashes[i] ^ (np.uint64(k * seq_len) * np.uint64(0x9E3779B97F4A7C15)))
    return total


@jit
def _document_loss_positions(hashes, offsets, masks):
    """Checksum of every (document, position) whose mask is 1; ``offsets`` index ``masks`` per document."""
    total = np.uint64(0)
    for i in range(hashes.shape[0]):
        for j in range(offsets[i + 1] - offsets[i]):
            if masks[offsets[i] + j]:
                total += _mix(hashes[i] ^ (np.uint64(j) * _POSITION))
    return total


@jit
def _segment_loss_positions(hashes, starts, lengths, masks):
    """The same checksum from segments (document hash, start in the document, length) laid end to end
    over ``masks``."""
    total = np.uint64(0)
    pos = 0
    for i in range(hashes.shape[0]):
        for j in range(lengths[i]):
            if masks[pos + j]:
                total += _mix(hashes[i] ^ (np.uint64(starts[i] + j) * _POSITION))
        pos += lengths[i]
    return total


@jit
def _id_sums(ids):
    total = np.uint64(0)
    squares = np.uint64(0)
    for i in range(ids.shape[0]):
        v = np.uint64(ids[i])
        total += v
        squares += v * v
    return total, squares


def id_hashes(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each string's UTF-8 bytes (FNV-1a, then a mixer)."""
    arr = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    arr = arr.cast(pa.large_string())
    _, offsets, data = arr.buffers()
    offsets = np.frombuffer(offsets, np.int64)[arr.offset:arr.offset + len(arr) + 1]
    data = np.frombuffer(data, np.uint8) if data is not None else np.empty(0, np.uint8)
    return _string_hashes(offsets, data)


def _list_lengths(column) -> np.ndarray:
    return pc.fill_null(pc.list_value_length(column), -1).to_numpy()


#: ``segments_histogram[k]``: sequences of k segments; the last entry counts this many or more.
MAX_SEGMENTS_BIN = 64


def segment_bins(max_segments: int | None) -> int:
    """The last entry of ``segments_histogram`` (it counts this many segments or more): 64, or the cap."""
    return max(MAX_SEGMENTS_BIN, max_segments or 0)


def sequence_figures(table: pa.Table, seq_len: int, max_bin: int = MAX_SEGMENTS_BIN) -> dict:
    """Figures of a sequences table as written (columns of :data:`~bfpack_spark.schemas.SEQUENCES`);
    with the fill (percent of ``seq_len``, 0..100) and segment-count histograms the report draws,
    and, where the sequences carry loss masks, the tokens with loss and their positions' checksum."""
    n_tokens = table.column("n_tokens").to_numpy()
    lists = table.column("seg_lengths").combine_chunks()
    seg_lengths = pc.list_flatten(lists).to_numpy()
    offsets = lists.offsets.to_numpy() - lists.offsets[0].as_py()
    ends = np.concatenate(([0], np.cumsum(seg_lengths)))
    inconsistent = ((_list_lengths(table.column("input_ids")) != n_tokens)
                    | (ends[offsets[1:]] - ends[offsets[:-1]] != n_tokens)
                    | (_list_lengths(table.column("doc_ids")) != np.diff(offsets)))
    hashes = id_hashes(pc.list_flatten(table.column("doc_ids")))
    starts = pc.list_flatten(table.column("seg_starts")).to_numpy()
    total, squares = _id_sums(table.column("seq_id").to_numpy())
    segments = np.diff(offsets)
    figures = {
        "rows": table.num_rows, "tokens": int(n_tokens.sum()), "segments": int(seg_lengths.shape[0]),
        "max_tokens": int(n_tokens.max(initial=0)), "max_segments": int(segments.max(initial=0)),
        "inconsistent_rows": int(inconsistent.sum()),
        "id_sum": int(total), "id_square_sum": int(squares),
        "doc_lengths": int(_weighted_sum(hashes, seg_lengths)), "doc_starts": int(_start_sum(hashes, starts)),
        "fill_histogram": np.bincount(n_tokens * 100 // seq_len, minlength=101).tolist(),
        "segments_histogram": np.bincount(np.minimum(segments, max_bin), minlength=max_bin + 1).tolist(),
    }
    masks = table.column("loss_mask") if "loss_mask" in table.column_names else None
    if masks is not None and masks.null_count < len(masks):
        masks = masks.combine_chunks()
        inconsistent |= _list_lengths(masks) != n_tokens
        values = pc.list_flatten(masks).to_numpy(zero_copy_only=False)
        figures.update(inconsistent_rows=int(inconsistent.sum()), loss_tokens=int(values.sum(dtype=np.int64)),
                       loss_positions=int(_segment_loss_positions(hashes, starts.astype(np.int64),
                                                                  seg_lengths.astype(np.int64), values)))
    return figures


def document_figures(doc_ids: pa.Array, n_tokens: np.ndarray, n_chunks: np.ndarray, seq_len: int,
                     masks: np.ndarray | None = None) -> dict:
    """Figures of a documents table as written: each document's length and its chunk starts; with
    ``masks`` (the documents' loss masks laid end to end), the tokens with loss and their positions."""
    hashes = id_hashes(doc_ids)
    figures = {"rows": len(doc_ids), "tokens": int(n_tokens.sum()),
               "doc_lengths": int(_weighted_sum(hashes, n_tokens)),
               "doc_starts": int(_chunk_start_sum(hashes, n_chunks.astype(np.int64), seq_len))}
    if masks is not None:
        offsets = np.concatenate(([0], np.cumsum(n_tokens, dtype=np.int64)))
        figures.update(loss_tokens=int(masks.sum(dtype=np.int64)),
                       loss_positions=int(_document_loss_positions(hashes, offsets, masks)))
    return figures


def add_figures(figures: Iterable[dict]) -> dict:
    """Figures of several files as one: counts and histograms add, checksums add modulo 2^64,
    maxima take the max."""
    total: dict = {}
    for f in figures:
        for key, value in f.items():
            if isinstance(value, list):
                total[key] = [a + b for a, b in zip_longest(total.get(key, []), value, fillvalue=0)]
            elif key.startswith("max_"):
                total[key] = max(total.get(key, 0), value)
            elif key in _CHECKSUMS:
                total[key] = (total.get(key, 0) + value) % MOD
            elif isinstance(value, int):
                total[key] = total.get(key, 0) + value
    return total
