"""Distributed packing plans, computed from item lengths alone.

A corpus is read in *groups* (one Spark task each) and cut into *items*: chunks of at
most L tokens. Items are packed by best-fit-decreasing in *partitions*, each on its
own, in stages:

- **Stage 0** has ``P`` partitions. Each gets an equal share of every *length bucket*
  (``n_buckets`` linear buckets over 1..L), so each is a scaled copy of the corpus and
  packs as tightly as the whole. A partition takes its share from the group(s) it is
  *home* to first (group ``g`` lives in partition ``g * P // n_groups``), so only the
  surplus of a group's length mix moves. Within a bucket, which items stay and which
  go where is decided by a low-discrepancy order over the exact lengths
  (:func:`_interleave`), so no target gets systematically the short or the long end of
  a bucket: on length-sorted input that bias alone costs 0.1-0.2% more sequences (see
  BENCHMARKS.md).
- Or, **in place**: each group packs its own items (:func:`pack_in_place`; ``reference.plan_bfd(...,
  route=False)`` with one partition per group). Nothing moves, and where groups are alike it is
  as tight; the pipeline takes it only when :func:`in_place_is_tight` proves it.
- Sequences filled to at least ``fill_threshold * L`` are *final*. The items of the
  others form the *residue*, packed again in **merge rounds** of
  ``ceil(residue / merge_items)`` length-stratified partitions, so that no task ever
  holds more than ``merge_items`` items, until a round of one partition (or a round
  that made little progress) makes everything final.

Everything a task needs is here as plain numpy: :class:`Routing` (built on the driver
from per-(source, bucket) counts, O(sources x buckets)) deals a source's items to
targets; :func:`pack_partition` packs one partition; :func:`merge_round` sizes the
next round. :func:`~bfpack_spark.packing.reference.plan_bfd` runs the same steps in one
process, for tests and for ``benchmarks/bench_plan.py``; Spark runs them in its tasks
(``stages/rounds.py``) and must give the same plan.

Sequence ids are dense and deterministic: stage 0's final sequences of partition 0, 1,
..., then each merge round's, each partition's numbered in the order BFD opened them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from bfpack_spark.packing.bfd import _bfd_kernel, validate_max_items
from bfpack_spark.packing.chunking import Chunks, chunk_documents
from bfpack_spark.packing.layout import _group_by_sequence

DEFAULT_BUCKETS = 256
_PHI = (math.sqrt(5.0) - 1.0) / 2.0


def length_buckets(lengths: npt.ArrayLike, seq_len: int, n_buckets: int) -> npt.NDArray[np.int64]:
    """The bucket of each item length in 1..seq_len: ``n_buckets`` linear buckets (at most one per length)."""
    n_buckets = min(n_buckets, seq_len)
    return (np.asarray(lengths, dtype=np.int64) - 1) * n_buckets // seq_len


def item_histogram(doc_lengths: npt.ArrayLike, seq_len: int, n_buckets: int) -> npt.NDArray[np.int64]:
    """How many items (chunks) documents of these lengths make, per length bucket."""
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    width = min(n_buckets, seq_len)
    counts = np.bincount(length_buckets(lengths[lengths % seq_len > 0] % seq_len, seq_len, n_buckets),
                         minlength=width)
    counts[length_buckets(seq_len, seq_len, n_buckets)] += int((lengths // seq_len).sum())
    return counts


def _interleave(buckets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Item order for dealing: by bucket, and within a bucket by a golden-ratio sequence over the
    items sorted by exact length, so that any run of consecutive items spans the bucket's lengths."""
    n = buckets.shape[0]
    by_length = np.lexsort((np.arange(n), lengths, buckets))
    b = buckets[by_length]
    index = np.arange(n) - np.searchsorted(b, b, side="left")
    key = np.mod((index + 1) * _PHI, 1.0)
    return by_length[np.lexsort((key, b))]


@dataclass(frozen=True)
class Routing:
    """How the items of ``S`` sources are dealt to ``n_targets`` targets, an equal share of
    every length bucket each (extra items of a bucket rotate, so targets' totals stay even).

    ``keep[s, b]`` items of source ``s`` in bucket ``b`` stay at its home target; the rest
    are *surplus*, numbered across sources from ``surplus_start[s, b]``, and target ``p``
    takes surplus numbers ``deficit_ends[b, p - 1]`` up to ``deficit_ends[b, p]``.
    """

    n_targets: int
    n_buckets: int
    home: npt.NDArray[np.int64]
    keep: npt.NDArray[np.int64]
    surplus_start: npt.NDArray[np.int64]
    deficit_ends: npt.NDArray[np.int64]

    @classmethod
    def from_counts(cls, counts: npt.ArrayLike, n_targets: int, home: npt.ArrayLike | None = None) -> Routing:
        """``counts[s, b]``: items of source ``s`` in bucket ``b``; ``home[s]``: the target a source
        fills first (None: every item is dealt)."""
        counts = np.asarray(counts, dtype=np.int64)
        n_sources, n_buckets = counts.shape
        totals = counts.sum(axis=0)
        base, extra = np.divmod(totals, n_targets)
        first = (np.cumsum(extra) - extra) % n_targets
        targets = np.arange(n_targets)[:, None]
        quota = base[None, :] + (((targets - first[None, :]) % n_targets) < extra[None, :])
        filled = np.zeros((n_targets, n_buckets), np.int64)
        keep = np.zeros_like(counts)
        homes = np.full(n_sources, -1, np.int64) if home is None else np.asarray(home, dtype=np.int64)
        if home is not None:
            for s in range(n_sources):  # sources sharing a home fill it in order
                h = homes[s]
                keep[s] = np.minimum(counts[s], quota[h] - filled[h])
                filled[h] += keep[s]
        surplus = counts - keep
        return cls(n_targets, n_buckets, homes, keep, np.cumsum(surplus, axis=0) - surplus,
                   np.cumsum(quota - filled, axis=0).T.copy())

    def targets(self, source: int, lengths: npt.ArrayLike, buckets: npt.ArrayLike,
                interleave: bool = True) -> npt.NDArray[np.int64]:
        """The target of each item of ``source`` (items in canonical order, as counted)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        buckets = np.asarray(buckets, dtype=np.int64)
        n = lengths.shape[0]
        order = _interleave(buckets, lengths) if interleave else np.argsort(buckets, kind="stable")
        b = buckets[order]
        rank = np.arange(n) - np.searchsorted(b, b, side="left")
        keep = self.keep[source, b]
        stay = rank < keep
        target = np.empty(n, np.int64)
        target[order[stay]] = self.home[source]
        number = (self.surplus_start[source, b] + rank - keep)[~stay]
        moving_b = b[~stay]
        span = int(self.deficit_ends[:, -1].max(initial=0)) + 1  # one search over all buckets at once
        ends = (self.deficit_ends + np.arange(self.n_buckets)[:, None] * span).ravel()
        flat = np.searchsorted(ends, number + moving_b * span, side="right")
        target[order[~stay]] = flat - moving_b * self.n_targets
        return target


@dataclass(frozen=True)
class Packed:
    """One partition packed: per item (canonical order), its sequence and place in it."""

    bin: npt.NDArray[np.int64]     # sequence within the partition, numbered as BFD opened them
    final: npt.NDArray[np.bool_]   # the sequence is final (else its items go to the next round)
    rank: npt.NDArray[np.int64]    # the sequence's number among the partition's final ones (-1: not final)
    slot: npt.NDArray[np.int64]    # position of the item within its sequence
    local: npt.NDArray[np.bool_]   # every item of the sequence comes from one group
    n_final: int


def pack_partition(lengths: npt.ArrayLike, groups: npt.ArrayLike, seq_len: int, threshold: float,
                   max_segments: int | None = None) -> Packed:
    """BFD over one partition's items (given in canonical order), at most ``max_segments`` per
    sequence when given; sequences filled to at least ``threshold * seq_len``, or holding
    ``max_segments`` items, are final (no later round could add to them)."""
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    groups = np.asarray(groups, dtype=np.int64)
    if lengths.shape[0] == 0:
        empty = np.empty(0, np.int64)
        return Packed(empty, np.empty(0, np.bool_), empty, empty, np.empty(0, np.bool_), 0)
    cap = validate_max_items(max_segments)
    bins, n_bins = _bfd_kernel(lengths, seq_len, cap)
    fill = np.bincount(bins, weights=lengths, minlength=n_bins)
    final_bin = fill >= threshold * seq_len
    if cap:
        final_bin |= np.bincount(bins, minlength=n_bins) >= cap
    rank_of_bin = np.where(final_bin, np.cumsum(final_bin) - 1, -1)
    offsets, order = _group_by_sequence(bins, n_bins)
    slot = np.empty(bins.shape[0], np.int64)
    slot[order] = np.arange(bins.shape[0]) - np.repeat(offsets[:-1], np.diff(offsets))
    lo = np.full(n_bins, np.iinfo(np.int64).max)
    hi = np.full(n_bins, -1)
    np.minimum.at(lo, bins, groups)
    np.maximum.at(hi, bins, groups)
    return Packed(bins, final_bin[bins], rank_of_bin[bins], slot, (lo == hi)[bins], int(final_bin.sum()))


#: A plan whose first round packed every group where it was read is taken when it makes at most this
#: share of sequences more than the lower bound (:func:`in_place_is_tight`): one-process BFD never
#: beats the bound, so such a plan is within this share of it too. Below 10,000 sequences that is
#: the bound itself.
IN_PLACE_SLACK = 1e-4


def pack_in_place(doc_lengths: npt.ArrayLike, seq_len: int, fill_threshold: float,
                  max_segments: int | None = None) -> tuple[Chunks, Packed]:
    """A group's documents cut into items and packed by BFD on their own: the first round of a
    plan that moves nothing where groups are alike (random order: each a sample of the corpus).
    The read stage runs it on the lengths it has just read, the assembly again on the same lengths
    (it is deterministic), so the plan of the final items never travels."""
    chunks = chunk_documents(doc_lengths, seq_len)
    return chunks, pack_partition(chunks.length, np.zeros(chunks.length.shape[0], np.int64), seq_len,
                                  fill_threshold, max_segments)


def warm_up() -> None:
    """Load the plan's kernels (from numba's cache: a quarter of a second at a process's first
    call). Spark's Python daemon does it before it forks the workers, and the driver while the
    read runs, so that no task and no plan waits for it."""
    pack_in_place(np.array([1, 2], np.int64), 2, 0.5)


def in_place_is_tight(n_sequences: int, tokens: int, items: int, seq_len: int,
                      max_segments: int | None = None) -> bool:
    """Whether an in-place plan of ``n_sequences`` is within IN_PLACE_SLACK of the lower bound:
    ceil(tokens / L), or with a cap on segments ceil(items / cap) where that is more."""
    lower = max(-(-tokens // seq_len), -(-items // max_segments) if max_segments else 0)
    return n_sequences <= lower + int(lower * IN_PLACE_SLACK)


def round_threshold(n_parts: int, fill_threshold: float, stalled: bool = False) -> float:
    """The fill below which a round's sequences go back to the next round. A round of one partition
    (one-process BFD over everything left), or one after a round that left more than half of its
    items unplaced (``stalled``: lengths that cannot fill a sequence to the threshold), makes every
    sequence final, so rounds always end."""
    return 0.0 if n_parts == 1 or stalled else fill_threshold


def merge_round(n_items: int, merge_items: int, fill_threshold: float, stalled: bool) -> tuple[int, float]:
    """Partitions and fill threshold of the next merge round over ``n_items`` residual items."""
    n_parts = max(1, -(-n_items // merge_items))
    return n_parts, round_threshold(n_parts, fill_threshold, stalled)


def packing_partitions(n_items: int, n_groups: int, merge_items: int, partitions: int | None = None) -> int:
    """Partitions of the first round: as set, else one per group; one when a single task can hold
    every item (at most ``merge_items``), so that the plan is one-process BFD exactly."""
    if partitions is not None:
        return partitions
    return 1 if n_items <= merge_items else n_groups


def home_targets(n_sources: int, n_targets: int) -> npt.NDArray[np.int64]:
    """The home partition of each group: groups are spread evenly, in order."""
    return np.arange(n_sources, dtype=np.int64) * n_targets // max(n_sources, 1)


def sequence_offsets(final_counts: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """First sequence id of each partition, in stage then partition order (exclusive prefix sum)."""
    counts = np.asarray(final_counts, dtype=np.int64)
    return np.cumsum(counts) - counts
