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

Both plans, and the concatenation baseline's (:func:`plan_concat`), are a
:class:`Plan`: one row per segment, in canonical order (document, then offset).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from bfpack_spark.packing._jit import jit
from bfpack_spark.packing.bfd import _bfd_kernel, _validate_seq_len
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
    counts = np.zeros(seq_len + 1, np.int64)
    for i in range(n):
        counts[lengths[i]] += 1
    order = np.empty(n, np.int64)
    begin = np.zeros(seq_len + 1, np.int64)  # rank of the first item of each length
    for x in range(seq_len - 1, 0, -1):
        begin[x] = begin[x + 1] + counts[x + 1]
    cursor = begin.copy()
    for i in range(n):
        order[cursor[lengths[i]]] = i
        cursor[lengths[i]] += 1

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


def plan_bfd(doc_lengths: npt.ArrayLike, doc_group: npt.ArrayLike, n_groups: int, seq_len: int,
             n_partitions: int, fill_threshold: float = 0.99, placement: str = "in_place") -> Plan:
    """Best-fit packing of the whole corpus as ``n_partitions`` BFD runs plus a residual merge.

    ``doc_lengths`` and ``doc_group`` list every document in canonical order (groups
    ascending). Sequences of a partition filled to at least ``fill_threshold * seq_len``
    are final; the items of the others are packed again together. Sequence ids are
    dense: final sequences of partition 0, 1, ..., then the residual merge's.
    """
    seq_len = _validate_seq_len(seq_len)
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
    if n_partitions < 1:
        raise ValueError(f"n_partitions must be at least 1, got {n_partitions}")
    if not 0.0 <= fill_threshold <= 1.0:
        raise ValueError(f"fill_threshold must be within [0, 1], got {fill_threshold}")
    doc_group = np.asarray(doc_group, dtype=np.int64)
    chunks = chunk_documents(doc_lengths, seq_len)
    n_items = len(chunks)
    home = doc_group[chunks.doc] * n_partitions // max(n_groups, 1)
    target = _route(chunks.length, home, n_partitions, seq_len, placement == "in_place")

    part_offsets, by_part = _group_by_sequence(target, n_partitions)  # canonical order within each
    seq = np.empty(n_items, np.int64)
    residual = np.zeros(n_items, np.bool_)
    n_final = 0
    min_fill = fill_threshold * seq_len
    for p in range(n_partitions):
        items = by_part[part_offsets[p]:part_offsets[p + 1]]
        if items.shape[0] == 0:
            continue
        bins, n_bins = _bfd_kernel(chunks.length[items], seq_len)
        fill = np.bincount(bins, weights=chunks.length[items], minlength=n_bins)
        final = fill >= min_fill
        renumber = np.cumsum(final) - 1 + n_final
        n_final += int(final.sum())
        keep = final[bins]
        seq[items[keep]] = renumber[bins[keep]]
        residual[items[~keep]] = True

    left = np.flatnonzero(residual)
    bins, n_res = _bfd_kernel(chunks.length[left], seq_len)
    seq[left] = n_final + bins
    return _finish(chunks.doc, chunks.start, chunks.length, seq, n_final + n_res, doc_group,
                   residual_items=int(left.shape[0]), residual_sequences=int(n_res))


def plan_concat(doc_lengths: npt.ArrayLike, doc_group: npt.ArrayLike, seq_len: int) -> Plan:
    """The concatenation baseline: documents in canonical order, the stream cut every ``seq_len``."""
    layout = concat_layout(doc_lengths, seq_len)
    seq = np.repeat(np.arange(layout.n_sequences, dtype=np.int64), np.diff(layout.seg_offsets))
    return _finish(layout.doc, layout.start, layout.length, seq, layout.n_sequences,
                   np.asarray(doc_group, dtype=np.int64))
