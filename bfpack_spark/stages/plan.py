"""Stage 3, plan: where every chunk goes, from lengths alone. :func:`make_plan` chooses how.

First, what the read stage's tasks have already made. A corpus one task could plan is planned
by the driver from the lengths they handed over (:func:`plan_on_driver`: one-process BFD). A
larger one takes each group packed on its own where it was read as the first round
(:func:`plan_in_place`), the few items that leaves packed in merge rounds (by the driver when
few). Where groups are alike (a corpus in random order) that is as tight as one-process BFD,
costs no Spark job and moves almost nothing; it is taken when it is provably within 0.01% of it
(of the lower bound). Else the routed plan runs (:func:`~.rounds.routed_plan`), in Spark tasks;
the rounds themselves are :mod:`.rounds`'.
"""

from __future__ import annotations

import logging

import numpy as np
from pyspark.sql import DataFrame

from bfpack_spark.config import PackingConfig
from bfpack_spark.packing.chunking import chunk_documents
from bfpack_spark.packing.plan import Routing, in_place_is_tight, merge_round, packing_partitions
from bfpack_spark.schemas import BUNDLE, spark_ddl
from bfpack_spark.stages import rounds
from bfpack_spark.stages.dedup import Duplicates, without_duplicates
from bfpack_spark.stages.read import GroupSummary, InPlace, InPlaceSettings, ReadResult
from bfpack_spark.stages.rounds import (
    DRIVER,
    IN_PLACE,
    PlanResult,
    Rounds,
    counts_matrix,
    finish,
    pack_rounds,
    routed_plan,
)

log = logging.getLogger(__name__)


def in_place_settings(packing: PackingConfig, n_groups: int) -> InPlaceSettings | None:
    """How the read tasks pack their own groups, the plan's first round where it serves (best-fit, with
    the packing partitions left to bfpack); each hands over at most its share of what the driver packs."""
    if packing.strategy != "bfd" or packing.partitions is not None:
        return None
    return InPlaceSettings(packing.residual_fill, packing.max_segments_per_sequence,
                           rounds.DRIVER_ITEMS // max(n_groups, 1))


def make_plan(read: ReadResult, dups: Duplicates, tokens: int, packing: PackingConfig) -> PlanResult:
    """The plan of the documents the read kept (but ``dups``) and their ``tokens``: by the driver, in
    place or routed (see the module); concatenation needs none (its sequences are counted)."""
    n_groups, seq_len = len(read.groups), packing.seq_len
    if packing.strategy != "bfd":
        return PlanResult(None, -(-tokens // seq_len), n_groups)
    items = np.array([g.items for g in read.groups], np.int64).reshape(n_groups, -1)
    for g, dropped in dups.items_by_group.items():
        items[g] -= dropped
    n_parts = packing_partitions(int(items.sum()), n_groups, packing.merge_items_per_partition, packing.partitions)
    how = Rounds.of(packing, rounds.DRIVER_ITEMS)
    plan = None
    if not dups.items_by_group and all(g.in_place is not None for g in read.groups):  # the read's work holds
        plan = (plan_on_driver(read.docs.sparkSession, read.groups, how) if n_parts == 1 else
                plan_in_place(read.residue, read.groups, tokens, how))
    if plan is None:
        kept = without_duplicates(read.docs, dups, n_groups)
        plan = routed_plan(kept, items, n_parts, how)
        plan.cached.append(kept)
    for summary in read.groups:  # the lengths and residue handed over: planned now
        summary.in_place = None
    return plan


def _figures(groups: list[GroupSummary]) -> list[InPlace]:
    figures = [g.in_place for g in groups]
    assert all(f is not None for f in figures)
    return figures  # type: ignore[return-value]


def plan_on_driver(spark, groups: list[GroupSummary], how: Rounds) -> PlanResult | None:
    """A plan of one partition (one-process BFD over every chunk), made by the driver from the
    document lengths each read task handed over with its summary (``in_place.lengths``); None when a
    group had too many to hand over."""
    figures = _figures(groups)
    if any(f.lengths is None for f in figures):
        return None
    parts = []
    for g, f in enumerate(figures):
        chunks = chunk_documents(np.asarray(f.lengths, np.int64), how.rnd.seq_len)
        parts.append({"group": np.full(len(chunks), g, np.int64), "doc_index": chunks.doc, "chunk": chunks.index,
                      "length": chunks.length})
    items = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    if not items["length"].shape[0]:
        return None
    result = PlanResult(None, 0, 1, n_items=items["length"].shape[0], first_round=DRIVER)
    # one round, of one partition, packed here: no fill threshold, no merge round, nothing for Spark
    pack_rounds(spark, result, Rounds(how.rnd, fill_threshold=0.0, merge_items=1, driver_items=0),
                [], items=None, n_targets=1, threshold=0.0, carried=items)
    return result


def plan_in_place(residue_rows: DataFrame, groups: list[GroupSummary], tokens: int, how: Rounds) -> PlanResult | None:
    """The plan whose first round the read stage's tasks packed, each group on its own where it was
    read (``groups[g].in_place``); the chunks it left go through merge rounds as in the routed
    plan: packed by the driver when few (handed over with the groups' counts), else dealt from the
    read's RESIDUE rows (``residue_rows``) to Spark tasks. Nothing moves but those chunks'
    sequences. None where it does not serve, and the routed plan runs instead: a group left too
    many chunks to hand on, or the plan is not within IN_PLACE_SLACK of the lower bound (groups
    unlike each other: each holds one length range, say), and so maybe not of one-process BFD."""
    figures = _figures(groups)
    seq_len, max_segments = how.rnd.seq_len, how.rnd.max_segments
    n_items = int(sum(np.asarray(g.items).sum() for g in groups))
    left = sum(f.residual_items for f in figures)
    at_least = sum(f.n_final for f in figures) + -(-sum(f.residual_tokens for f in figures) // seq_len)
    if not all(f.residue_row for f in figures) or not in_place_is_tight(at_least, tokens, n_items, seq_len,
                                                                         max_segments):
        log.info("plan: round 0 routed (in place: %d of %d groups handed their residue on; at least %d sequences)",
                 sum(f.residue_row for f in figures), len(figures), at_least)
        return None
    result = PlanResult(None, 0, len(groups), n_items=n_items, residual_items=left, first_round=IN_PLACE)
    finals_by_round = [[f.n_final for f in figures]]
    try:
        _merge_in_place(residue_rows, result, figures, finals_by_round, how)
    except BaseException:
        result.unpersist()
        raise
    if not in_place_is_tight(result.n_sequences, tokens, n_items, seq_len, max_segments):
        log.info("plan: round 0 routed (in place made %d sequences)", result.n_sequences)
        result.unpersist()
        return None
    return result


def _merge_in_place(residue_rows: DataFrame, result: PlanResult, figures: list[InPlace],
                    finals_by_round: list[list[int]], how: Rounds) -> None:
    """The merge rounds of an in-place plan: its residue packed by the driver when small and handed
    over, else dealt from the RESIDUE rows to Spark tasks."""
    rnd, left = how.rnd, result.residual_items
    if left:
        n_targets, threshold = merge_round(left, how.merge_items, how.fill_threshold, stalled=False)
        carried = items = None
        if n_targets == 1 and left <= how.driver_items and all(f.residue is not None for f in figures):
            carried = {name: np.array([v for f in figures for v in (f.residue or {})[name]], np.int64)
                       for name in ("doc_index", "chunk", "length")}
            carried["group"] = np.repeat(np.arange(len(figures)), [f.residual_items for f in figures])
        else:
            counts = counts_matrix({(g, b): n for g, f in enumerate(figures)
                                    for b, n in zip(f.residue_buckets, f.residue_counts)},
                                   len(figures), min(rnd.n_buckets, rnd.seq_len))
            items = residue_rows.mapInArrow(rnd.route_residue_rows(Routing.from_counts(counts, n_targets)),
                                            spark_ddl(BUNDLE))
        pack_rounds(residue_rows.sparkSession, result, how, finals_by_round, items=items, n_targets=n_targets,
                    threshold=threshold, carried=carried, n_items=left)
    else:
        finish(result, finals_by_round)


