"""Splitting documents into packable items (the paper's step 1).

A document of ``n`` tokens becomes ``n // L`` chunks of exactly ``L`` tokens and,
when ``n % L > 0``, one remainder chunk. Documents of at most ``L`` tokens stay
whole, so best-fit packing cuts only documents that cannot fit any sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from bfpack_spark.packing.bfd import _validate_seq_len


@dataclass(frozen=True)
class Chunks:
    """Items to pack: one entry per chunk, ordered by document, then by position.

    ``doc`` indexes the input documents, ``index`` is the chunk's number within its
    document, ``start`` its token offset in the document, ``length`` its size.
    """

    doc: npt.NDArray[np.int64]
    index: npt.NDArray[np.int64]
    start: npt.NDArray[np.int64]
    length: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.doc.shape[0])


def chunks_per_document(doc_lengths: npt.ArrayLike, seq_len: int) -> npt.NDArray[np.int64]:
    """ceil(n / L) for each document: the number of items it becomes (0 when empty)."""
    seq_len = _validate_seq_len(seq_len)
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    return (lengths + (seq_len - 1)) // seq_len


def chunk_documents(doc_lengths: npt.ArrayLike, seq_len: int) -> Chunks:
    """Split documents of the given token lengths into chunks of at most ``seq_len``.

    Empty documents yield no chunk; a negative length raises ``ValueError``.
    """
    lengths = np.asarray(doc_lengths)
    if lengths.ndim != 1 or (lengths.size and not np.issubdtype(lengths.dtype, np.integer)):
        raise ValueError(f"doc_lengths must be a 1-D integer array, got {lengths.dtype} {lengths.shape}")
    lengths = lengths.astype(np.int64, copy=False)
    if lengths.size and lengths.min() < 0:
        bad = int(np.argmax(lengths < 0))
        raise ValueError(f"document {bad} has a negative length {lengths[bad]}")
    n_chunks = chunks_per_document(lengths, seq_len)
    doc = np.repeat(np.arange(lengths.shape[0], dtype=np.int64), n_chunks)
    first = np.cumsum(n_chunks) - n_chunks
    index = np.arange(doc.shape[0], dtype=np.int64) - np.repeat(first, n_chunks)
    start = index * seq_len
    length = np.minimum(seq_len, lengths[doc] - start)
    return Chunks(doc=doc, index=index, start=start, length=length)
