"""The one-process packing API: what the Spark job must equal, and what tests and benchmarks use.

- :func:`~bfpack_spark.packing.layout.bfd_layout` and :func:`~bfpack_spark.packing.layout.concat_layout`:
  best-fit-decreasing over every chunk at once, and the concatenation baseline (``layout.py``);
- :func:`plan_bfd`: the distributed plan (routed first round or in place, merge rounds) run in one
  process, step for step as Spark's tasks run it (``stages/rounds.py``), and :func:`plan_concat`;
- :func:`~bfpack_spark.packing.arrow.pack_token_lists`: all of it over real token lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from bfpack_spark.packing.arrow import pack_token_lists
from bfpack_spark.packing.bfd import _validate_seq_len
from bfpack_spark.packing.chunking import chunk_documents
from bfpack_spark.packing.layout import Layout, bfd_layout, concat_layout
from bfpack_spark.packing.plan import (
    DEFAULT_BUCKETS,
    Routing,
    home_targets,
    length_buckets,
    merge_round,
    pack_partition,
    round_threshold,
)

__all__ = ["Plan", "bfd_layout", "concat_layout", "pack_token_lists", "plan_bfd", "plan_concat"]


@dataclass(frozen=True)
class Plan:
    """Where every segment of every document goes (one-process form, for tests and benchmarks).

    Segment ``j`` is tokens ``start[j]:start[j] + length[j]`` of document ``doc[j]``
    (canonical order: document, then offset); it is the ``slot[j]``-th segment of
    sequence ``seq[j]``. ``local[j]``: its whole sequence comes from one group.
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
    merge_rounds: int = 0

    def layout(self) -> Layout:
        """The same plan as sequences of segments (sorted by sequence, then slot)."""
        order = np.lexsort((self.slot, self.seq))
        seg_offsets = np.searchsorted(self.seq[order], np.arange(self.n_sequences + 1))
        return Layout(seg_offsets.astype(np.int64), self.doc[order], self.start[order], self.length[order])


def plan_bfd(doc_lengths: npt.ArrayLike, doc_group: npt.ArrayLike, n_groups: int, seq_len: int,
             n_partitions: int, *, fill_threshold: float = 0.99, merge_items: int = 200_000,
             n_buckets: int = DEFAULT_BUCKETS, max_segments: int | None = None, interleave: bool = True,
             route: bool = True) -> Plan:
    """Best-fit packing as Spark runs it, in one process.

    ``doc_lengths`` and ``doc_group`` list every document in canonical order (groups
    ascending). ``max_segments`` caps segments per sequence in every round.
    ``interleave=False`` and ``route=False`` (stage 0 keeps every item at home) exist to
    measure what they buy (``benchmarks/bench_plan.py``).
    """
    seq_len = _validate_seq_len(seq_len)
    if n_partitions < 1:
        raise ValueError(f"n_partitions must be at least 1, got {n_partitions}")
    if not 0.0 <= fill_threshold <= 1.0:
        raise ValueError(f"fill_threshold must be within [0, 1], got {fill_threshold}")
    chunks = chunk_documents(doc_lengths, seq_len)
    group = np.asarray(doc_group, dtype=np.int64)[chunks.doc]
    bucket = length_buckets(chunks.length, seq_len, n_buckets)
    n = chunks.length.shape[0]
    seq = np.empty(n, np.int64)
    slot = np.empty(n, np.int64)
    local = np.empty(n, np.bool_)
    items, source, n_sources = np.arange(n), group, n_groups
    home: npt.NDArray[np.int64] | None = home_targets(n_groups, n_partitions)
    n_targets, threshold, next_id = n_partitions, round_threshold(n_partitions, fill_threshold), 0
    residual_items = rounds = stage0_sequences = 0
    while items.shape[0]:
        counts = np.zeros((n_sources, min(n_buckets, seq_len)), np.int64)
        np.add.at(counts, (source, bucket[items]), 1)
        routing = Routing.from_counts(counts, n_targets, home)
        target = np.empty(items.shape[0], np.int64)
        for s in np.unique(source):
            mine = np.flatnonzero(source == s)
            target[mine] = (routing.home[s] if not route else
                            routing.targets(s, chunks.length[items[mine]], bucket[items[mine]], interleave))
        left, left_source = [], []
        for p in range(n_targets):
            part = items[target == p]  # canonical order
            packed = pack_partition(chunks.length[part], group[part], seq_len, threshold, max_segments)
            done = part[packed.final]
            seq[done] = next_id + packed.rank[packed.final]
            slot[done], local[done] = packed.slot[packed.final], packed.local[packed.final]
            next_id += packed.n_final
            left.append(part[~packed.final])
            left_source.append(np.full(left[-1].shape[0], p))
        rest = np.concatenate(left)
        if rounds == 0:
            residual_items, stage0_sequences = rest.shape[0], next_id
        stalled = rounds > 0 and rest.shape[0] > items.shape[0] // 2
        order = np.argsort(rest, kind="stable")
        items, source, n_sources = rest[order], np.concatenate(left_source)[order], n_targets
        n_targets, threshold = merge_round(items.shape[0], merge_items, fill_threshold, stalled)
        home, route = None, True
        rounds += bool(items.shape[0])
    return Plan(chunks.doc, chunks.start, chunks.length, seq, slot, local, next_id,
                residual_items=residual_items, residual_sequences=next_id - stage0_sequences,
                merge_rounds=rounds)


def plan_concat(doc_lengths: npt.ArrayLike, doc_group: npt.ArrayLike, seq_len: int) -> Plan:
    """The concatenation baseline: documents in canonical order, the stream cut every ``seq_len``."""
    layout = concat_layout(doc_lengths, seq_len)
    seq = np.repeat(np.arange(layout.n_sequences, dtype=np.int64), np.diff(layout.seg_offsets))
    slot = np.arange(seq.shape[0]) - layout.seg_offsets[seq]
    group = np.asarray(doc_group, dtype=np.int64)[layout.doc]
    lo = np.full(layout.n_sequences, np.iinfo(np.int64).max)
    hi = np.full(layout.n_sequences, -1)
    np.minimum.at(lo, seq, group)
    np.maximum.at(hi, seq, group)
    return Plan(layout.doc, layout.start, layout.length, seq, slot, (lo == hi)[seq], layout.n_sequences)
