"""Distributed packing plans, computed from document lengths alone.

A corpus is read in *groups* (content-defined input splits, one Spark task each).
Packing happens in ``P`` *packing partitions*, each packed by BFD on its own, and the
items of under-filled sequences of every partition are packed together again in a
final *residual merge*. Only lengths are needed to decide all of this, so the whole
plan is computed before a single token moves; tokens then move at most once.

Stratification. A partition of same-length items packs badly, so every partition
gets an equal share of every item length: take all items longest first (ties in
canonical order) and deal them round-robin; partition ``p`` gets the items of rank
``k`` with ``k % P == p``. Each partition is then a scaled copy of the corpus, and
per-partition BFD plus the residual merge uses as few sequences as BFD over the
whole corpus (see ``tests/test_plan.py``).

Placement. Which items fill a partition's quota of a length is free. With
``placement="in_place"`` a partition takes its quota from the groups it is the home
of (group ``g`` lives in partition ``g * P // n_groups``) and only the surplus moves
to partitions short of that length; a sequence made only of one group's items is
then assembled where that group was read, and nothing of it crosses the network.
With ``placement="shuffle"`` items are dealt by rank alone, and nearly every
sequence is assembled after a full shuffle.

The steps are separate functions so that Spark can run the packing ones in its
tasks: :func:`route` (deal chunks to partitions), :func:`pack_parts` (BFD within each
partition, and again within each part of the residue), :func:`assign_sequences`
(dense sequence ids, slots, locality); :func:`plan_bfd` runs them all in one process.
Both plans, and the concatenation baseline's (:func:`plan_concat`), are a
:class:`Plan`: one row per segment, in canonical order (document, then offset).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from bfpack_spark.packing._jit import jit
from bfpack_spark.packing.bfd import _bfd_kernel, _validate_seq_len, longest_first
from bfpack_spark.packing.chunking import chunk_documents
from bfpack_spark.packing.layout import Layout, _group_by_sequence, concat_layout

PLACEMENTS = ("in_place", "shuffle")


@dataclass(frozen=True)
class Plan:
    """Where every segment of every document goes.

    Segment ``j`` is tokens ``start[j]:start[j] + length[j]`` of document ``doc[j]``
    (documents in canonical order); it is the ``slot[j]``-th segment of sequence
    ``seq[j]``. ``local[j]`` says its whole sequence comes from the documents of one
    group, so that group's task can emit it without moving tokens.
    """

    doc: npt.NDArray[np.int64]
    start: npt.NDArray[np.int64]
    length: npt.NDArray[np.int64]
    seq: npt.NDArray[np.int64]
    slot: npt.NDArray[np.int64]
    local: npt.NDArray[np.bool_]
    n_sequences: int
    residual_items: int = 0
    residual_sequences: int = 0

    def layout(self) -> Layout:
        """The same plan as sequences of segments (sorted by sequence, then slot)."""
        seg_offsets, order = _group_by_sequence(self.seq, self.n_sequences)  # slots ascend
        return Layout(seg_offsets, self.doc[order], self.start[order], self.length[order])


def _finish(doc, start, length, seq, n_seqs, doc_group, **extra) -> Plan:
    """Slots (segment order within a sequence, by canonical order) and locality."""
    seg_offsets, order = _group_by_sequence(seq, n_seqs)
    slot = np.empty(seq.shape[0], np.int64)
    slot[order] = np.arange(seq.shape[0]) - np.repeat(seg_offsets[:-1], np.diff(seg_offsets))
    group = doc_group[doc]
    lo = np.full(n_seqs, np.iinfo(np.int64).max)
    hi = np.full(n_seqs, -1)
    np.minimum.at(lo, seq, group)
    np.maximum.at(hi, seq, group)
    local = (lo == hi)[seq]
    return Plan(doc, start, length, seq, slot, local, int(n_seqs), **extra)


@jit
def _route(lengths, home, n_parts, seq_len, keep_home):
    """Target partition of each item: an equal share of every length per partition."""
    n = lengths.shape[0]
    order, begin, counts = longest_first(lengths, seq_len)
    target = np.empty(n, np.int64)
    quota = np.empty(n_parts, np.int64)
    used = np.empty(n_parts, np.int64)
    for x in range(seq_len, 0, -1):
        s, e = begin[x], begin[x] + counts[x]
        if s == e:
            continue
        if not keep_home:
            for k in range(s, e):
                target[order[k]] = k % n_parts
            continue
        base, rem = (e - s) // n_parts, (e - s) % n_parts
        for p in range(n_parts):
            quota[p] = base + (1 if (p - s) % n_parts < rem else 0)
            used[p] = 0
        n_surplus = 0
        for k in range(s, e):  # home first, in canonical order, up to the quota
            i = order[k]
            h = home[i]
            if used[h] < quota[h]:
                target[i] = h
                used[h] += 1
            else:
                target[i] = -1
                n_surplus += 1
        p = 0
        for k in range(s, e):  # surplus to the partitions still short, in order
            i = order[k]
            if target[i] == -1:
                while used[p] >= quota[p]:
                    p += 1
                target[i] = p
                used[p] += 1
    return target


@dataclass(frozen=True)
class Items:
    """The chunks to pack, in canonical order, each with the packing partition it goes to."""

    doc: npt.NDArray[np.int64]
    start: npt.NDArray[np.int64]
    length: npt.NDArray[np.int64]
    part: npt.NDArray[np.int64]


def route(doc_lengths: npt.ArrayLike, doc_group: npt.ArrayLike, n_groups: int, seq_len: int,
          n_partitions: int, placement: str = "in_place") -> Items:
    """Chunk the documents and deal the chunks to partitions, an equal share of every length each."""
    seq_len = _validate_seq_len(seq_len)
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
    if n_partitions < 1:
        raise ValueError(f"n_partitions must be at least 1, got {n_partitions}")
    chunks = chunk_documents(doc_lengths, seq_len)
    home = np.asarray(doc_group, dtype=np.int64)[chunks.doc] * n_partitions // max(n_groups, 1)
    part = _route(chunks.length, home, n_partitions, seq_len, placement == "in_place")
    return Items(chunks.doc, chunks.start, chunks.length, part)


def pack_parts(part: np.ndarray, lengths: np.ndarray, seq_len: int,
               fill_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """BFD within each part separately, items taken in the order given (canonical order).

    Returns each item's sequence number within its part, and whether that sequence is
    filled to at least ``fill_threshold * seq_len`` (final) or goes to the residual merge.
    """
    part = np.asarray(part, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    bins = np.empty(part.shape[0], np.int64)
    final = np.empty(part.shape[0], np.bool_)
    if part.shape[0] == 0:
        return bins, final
    n_parts = int(part.max()) + 1
    offsets, by_part = _group_by_sequence(part, n_parts)
    for p in range(n_parts):
        items = by_part[offsets[p]:offsets[p + 1]]
        if items.shape[0] == 0:
            continue
        b, n = _bfd_kernel(lengths[items], seq_len)
        fill = np.bincount(b, weights=lengths[items], minlength=n)
        bins[items] = b
        final[items] = (fill >= fill_threshold * seq_len)[b]
    return bins, final


def residual_parts(lengths: np.ndarray, seq_len: int, n_reduce: int) -> np.ndarray:
    """The reduce partition of each residual item: stratified by length, like the packing partitions."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return _route(lengths, np.zeros(lengths.shape[0], np.int64), max(1, n_reduce), seq_len, False)


def sequence_ids(part: np.ndarray, bins: np.ndarray, first: int = 0) -> tuple[np.ndarray, int]:
    """Dense ids ``first, first+1, ...`` for the distinct (part, sequence) pairs, in that order."""
    if part.shape[0] == 0:
        return np.empty(0, np.int64), first
    key = part * (int(bins.max()) + 1) + bins
    uniq, ids = np.unique(key, return_inverse=True)
    return ids.astype(np.int64) + first, first + int(uniq.shape[0])


def assign_sequences(items: Items, bins: np.ndarray, final: np.ndarray, residual_part: np.ndarray,
                     residual_bins: np.ndarray, doc_group: np.ndarray) -> Plan:
    """The plan from both packing stages: final sequences of partition 0, 1, ..., then the
    residual merge's, numbered densely."""
    seq = np.empty(items.length.shape[0], np.int64)
    seq[final], n_final = sequence_ids(items.part[final], bins[final])
    seq[~final], n_seqs = sequence_ids(residual_part, residual_bins, n_final)
    return _finish(items.doc, items.start, items.length, seq, n_seqs, np.asarray(doc_group, np.int64),
                   residual_items=int((~final).sum()), residual_sequences=n_seqs - n_final)


def plan_bfd(doc_lengths: npt.ArrayLike, doc_group: npt.ArrayLike, n_groups: int, seq_len: int,
             n_partitions: int, fill_threshold: float = 0.99, placement: str = "in_place",
             n_reduce: int = 1) -> Plan:
    """Best-fit packing of the whole corpus as ``n_partitions`` BFD runs plus a residual merge,
    in one process (Spark runs the same steps, :func:`pack_parts` in its tasks).

    ``doc_lengths`` and ``doc_group`` list every document in canonical order (groups
    ascending). Sequences of a partition filled to at least ``fill_threshold * seq_len``
    are final; the items of the others are packed again together, in ``n_reduce``
    length-stratified parts.
    """
    if not 0.0 <= fill_threshold <= 1.0:
        raise ValueError(f"fill_threshold must be within [0, 1], got {fill_threshold}")
    items = route(doc_lengths, doc_group, n_groups, seq_len, n_partitions, placement)
    bins, final = pack_parts(items.part, items.length, seq_len, fill_threshold)
    left = items.length[~final]
    rpart = residual_parts(left, seq_len, n_reduce)
    rbins, _ = pack_parts(rpart, left, seq_len, 0.0)
    return assign_sequences(items, bins, final, rpart, rbins, doc_group)


def plan_concat(doc_lengths: npt.ArrayLike, doc_group: npt.ArrayLike, seq_len: int) -> Plan:
    """The concatenation baseline: documents in canonical order, the stream cut every ``seq_len``."""
    layout = concat_layout(doc_lengths, seq_len)
    seq = np.repeat(np.arange(layout.n_sequences, dtype=np.int64), np.diff(layout.seg_offsets))
    return _finish(layout.doc, layout.start, layout.length, seq, layout.n_sequences,
                   np.asarray(doc_group, dtype=np.int64))
