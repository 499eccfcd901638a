"""Layouts: which piece of which document goes where, computed from lengths alone.

A :class:`Layout` lists the segments of every sequence in order. Both packing
strategies produce one, best-fit packing (:func:`bfd_layout`) and the
concatenate-and-cut baseline (:func:`concat_layout`), so everything downstream
(gathering tokens, metrics, Spark output) treats them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from bfpack_spark.packing._jit import jit
from bfpack_spark.packing.bfd import _bfd_kernel, _validate_lengths, _validate_seq_len, validate_max_items
from bfpack_spark.packing.chunking import chunk_documents

STRATEGIES = ("bfd", "concat")


@dataclass(frozen=True)
class Layout:
    """Sequences as runs of segments.

    Sequence ``s`` holds segments ``seg_offsets[s]:seg_offsets[s + 1]``, in order;
    segment ``j`` is tokens ``start[j]:start[j] + length[j]`` of document ``doc[j]``.
    """

    seg_offsets: npt.NDArray[np.int64]
    doc: npt.NDArray[np.int64]
    start: npt.NDArray[np.int64]
    length: npt.NDArray[np.int64]

    @property
    def n_sequences(self) -> int:
        return int(self.seg_offsets.shape[0] - 1)

    @property
    def n_segments(self) -> int:
        return int(self.doc.shape[0])

    def token_offsets(self) -> npt.NDArray[np.int64]:
        """Offsets of each sequence's tokens in the concatenated output."""
        ends = np.concatenate(([0], np.cumsum(self.length)))
        return ends[self.seg_offsets]

    def sequence_lengths(self) -> npt.NDArray[np.int64]:
        return np.diff(self.token_offsets())


@jit
def _group_by_sequence(assignment, n_seqs):
    """Stable counting sort of items by sequence: offsets per sequence and item order."""
    offsets = np.zeros(n_seqs + 1, np.int64)
    for s in assignment:
        offsets[s + 1] += 1
    for s in range(n_seqs):
        offsets[s + 1] += offsets[s]
    cursor = offsets[:-1].copy()
    order = np.empty(assignment.shape[0], np.int64)
    for i in range(assignment.shape[0]):
        s = assignment[i]
        order[cursor[s]] = i
        cursor[s] += 1
    return offsets, order


def bfd_layout(doc_lengths: npt.ArrayLike, seq_len: int, max_segments: int | None = None) -> Layout:
    """Best-fit packing: chunk documents longer than ``seq_len``, then pack chunks by BFD
    (at most ``max_segments`` per sequence, when given).

    Segments of a sequence appear in document order.
    """
    seq_len = _validate_seq_len(seq_len)
    chunks = chunk_documents(doc_lengths, seq_len)
    lengths = _validate_lengths(chunks.length, seq_len)
    assignment, n_seqs = _bfd_kernel(lengths, seq_len, validate_max_items(max_segments))
    seg_offsets, order = _group_by_sequence(assignment, n_seqs)
    return Layout(seg_offsets, chunks.doc[order], chunks.start[order], chunks.length[order])


def concat_pieces(doc_lengths: npt.ArrayLike, seq_len: int,
                  first_token: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Documents concatenated in order into a stream whose first token is at ``first_token``,
    cut every ``seq_len``: (doc, start, length, sequence) of every piece, in stream order."""
    seq_len = _validate_seq_len(seq_len)
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    if lengths.size and lengths.min() < 0:
        raise ValueError("document lengths must not be negative")
    doc_start = first_token + np.cumsum(lengths) - lengths  # position of each document in the stream
    nonempty = lengths > 0
    first = np.where(nonempty, doc_start // seq_len, 0)
    last = np.where(nonempty, (doc_start + lengths - 1) // seq_len, -1)
    pieces = last - first + 1
    doc = np.repeat(np.arange(lengths.shape[0], dtype=np.int64), pieces)
    piece = np.arange(doc.shape[0], dtype=np.int64) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    seq = first[doc] + piece
    start = np.maximum(0, seq * seq_len - doc_start[doc])
    end = np.minimum(lengths[doc], (seq + 1) * seq_len - doc_start[doc])
    return doc, start, end - start, seq


def concat_layout(doc_lengths: npt.ArrayLike, seq_len: int) -> Layout:
    """The baseline: documents concatenated in input order, the stream cut every ``seq_len``."""
    doc, start, length, seq = concat_pieces(doc_lengths, seq_len)
    n_seqs = -(-int(length.sum()) // seq_len)
    seg_offsets = np.searchsorted(seq, np.arange(n_seqs + 1), side="left").astype(np.int64)
    return Layout(seg_offsets, doc, start, length)


def make_layout(doc_lengths: npt.ArrayLike, seq_len: int, strategy: str = "bfd",
                max_segments: int | None = None) -> Layout:
    """The layout of ``strategy`` ("bfd" or "concat") for documents of these lengths; ``max_segments``
    caps segments per sequence (best-fit only)."""
    if strategy == "bfd":
        return bfd_layout(doc_lengths, seq_len, max_segments)
    if max_segments is not None:
        raise ValueError("max_segments caps best-fit packing; the concat baseline cuts a stream and has no cap")
    if strategy == "concat":
        return concat_layout(doc_lengths, seq_len)
    raise ValueError(f"unknown packing strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
