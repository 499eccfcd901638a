"""Stage 3, plan: where every chunk goes, from lengths alone, computed in Spark tasks.

The steps are those of :mod:`bfpack_spark.packing.plan` (read its docstring first):
each round counts its items per (source, length bucket), the driver turns the counts
into a :class:`~bfpack_spark.packing.plan.Routing`, tasks deal their items to the
round's partitions, and one task per partition packs them by BFD. Sequences filled
to the threshold are final; the rest go to the next round. The driver holds counts
per (source, bucket) and per partition, never a row per document or chunk, and the
result is a DataFrame: for each item, its sequence id, its slot and whether its
sequence is made of one group's documents.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from bfpack_spark.packing.chunking import chunk_documents
from bfpack_spark.packing.plan import (
    Routing,
    home_targets,
    length_buckets,
    merge_round,
    pack_partition,
    sequence_offsets,
)
from bfpack_spark.schemas import ITEM, PACKED, PLAN, spark_ddl
from bfpack_spark.spark.partitioning import exact_partitions
from bfpack_spark.stages.assemble import as_orders

log = logging.getLogger(__name__)


@dataclass
class PlanResult:
    """The plan: one PLAN order per item (``orders``), and its figures."""

    orders: DataFrame | None
    n_sequences: int
    n_partitions: int
    n_items: int = 0
    residual_items: int = 0
    residual_sequences: int = 0
    merge_rounds: int = 0
    moved_segments: int = 0
    moved_tokens: int = 0
    cached: list[DataFrame] = field(default_factory=list)

    def unpersist(self) -> None:
        for df in self.cached:
            df.unpersist()


def _table(batches) -> pa.Table | None:
    batches = list(batches)
    return pa.Table.from_batches(batches) if batches else None


def _by_source(table: pa.Table, column: str) -> Iterator[tuple[int, pa.Table]]:
    """Rows of each source in the partition, in canonical order (a partition usually holds one)."""
    table = table.sort_by([(column, "ascending"), ("group", "ascending"), ("doc_index", "ascending")]
                          + ([("chunk", "ascending")] if "chunk" in table.column_names else []))
    keys = table.column(column).to_numpy()
    bounds = np.flatnonzero(np.diff(keys, prepend=keys[0] - 1) != 0).tolist() + [len(keys)]
    for s, e in zip(bounds, bounds[1:]):
        yield int(keys[s]), table.slice(s, e - s)


def _chunks(docs: pa.Table, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc_index, chunk, length) of every chunk of these documents (in canonical order)."""
    chunks = chunk_documents(docs.column("n_tokens").to_numpy(), seq_len)
    return docs.column("doc_index").to_numpy()[chunks.doc], chunks.index, chunks.length


def _item_batch(group, doc_index, chunk, length, target) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([
        pa.array(np.asarray(group, np.int32)), pa.array(np.asarray(doc_index, np.int64)),
        pa.array(np.asarray(chunk, np.int32)), pa.array(np.asarray(length, np.int32)),
        pa.array(np.asarray(target, np.int32))], schema=ITEM)


class _Round:
    """The tasks of one packing round: count, route, pack (pickled into Spark tasks)."""

    def __init__(self, seq_len: int, n_buckets: int):
        self.seq_len, self.n_buckets = seq_len, n_buckets

    def route_documents(self, routing: Routing):
        def route(batches) -> Iterator[pa.RecordBatch]:
            table = _table(batches)
            if table is None:
                return
            for g, docs in _by_source(table, "group"):
                doc_index, chunk, length = _chunks(docs, self.seq_len)
                target = routing.targets(g, length, length_buckets(length, self.seq_len, self.n_buckets))
                yield _item_batch(np.full(length.shape[0], g), doc_index, chunk, length, target)
        return route

    def route_residue(self, routing: Routing):
        def route(batches) -> Iterator[pa.RecordBatch]:
            table = _table(batches)
            if table is None:
                return
            for p, items in _by_source(table, "part"):
                length = items.column("length").to_numpy()
                target = routing.targets(p, length, length_buckets(length, self.seq_len, self.n_buckets))
                yield _item_batch(items.column("group"), items.column("doc_index"), items.column("chunk"),
                                  length, target)
        return route

    def pack(self, threshold: float):
        seq_len = self.seq_len

        def pack(batches) -> Iterator[pa.RecordBatch]:
            table = _table(batches)
            if table is None:
                return
            for p, items in _by_source(table, "target"):
                packed = pack_partition(items.column("length").to_numpy(), items.column("group").to_numpy(),
                                        seq_len, threshold)
                yield pa.RecordBatch.from_arrays([
                    items.column("group").combine_chunks(), items.column("doc_index").combine_chunks(),
                    items.column("chunk").combine_chunks(), items.column("length").combine_chunks(),
                    pa.array(np.full(items.num_rows, p, np.int32)), pa.array(packed.final),
                    pa.array(packed.rank), pa.array(packed.slot.astype(np.int32)), pa.array(packed.local)],
                    schema=PACKED)
        return pack


def _round_figures(packed: DataFrame, seq_len: int, n_buckets: int) -> tuple[dict, dict, tuple[int, int]]:
    """Per partition: final sequences; per (partition, bucket): residual items; and the moved
    (non-local) final items and their tokens. One aggregation, O(partitions x buckets) rows."""
    bucket = F.when(~F.col("final"), F.expr(f"(length - 1) * {min(n_buckets, seq_len)} div {seq_len}"))
    rows = packed.groupBy("part", "final", bucket.alias("bucket")).agg(
        F.count("*").alias("n"), F.max("rank").alias("max_rank"),
        F.sum(F.when(~F.col("local"), 1).otherwise(0)).alias("moved"),
        F.sum(F.when(~F.col("local"), F.col("length")).otherwise(0)).alias("moved_tokens")).collect()
    finals, residue, moved, moved_tokens = {}, {}, 0, 0
    for r in rows:
        if r["final"]:
            finals[r["part"]] = r["max_rank"] + 1
            moved += r["moved"]
            moved_tokens += r["moved_tokens"]
        else:
            residue[(r["part"], r["bucket"])] = r["n"]
    return finals, residue, (moved, moved_tokens)


def _counts_matrix(counts: dict, n_sources: int, n_buckets: int) -> np.ndarray:
    matrix = np.zeros((n_sources, n_buckets), np.int64)
    for (s, b), n in counts.items():
        matrix[s, b] += n
    return matrix


def plan_bfd(kept: DataFrame, counts: np.ndarray, seq_len: int, n_partitions: int, fill_threshold: float,
             merge_items: int, n_buckets: int) -> PlanResult:
    """Best-fit plan of the packable documents ``kept`` (DOC rows, each group's in one partition);
    ``counts[g, b]``: the chunks of group ``g``'s documents in length bucket ``b``."""
    spark = kept.sparkSession
    rnd = _Round(seq_len, n_buckets)
    width = min(n_buckets, seq_len)
    n_groups = counts.shape[0]
    routing = Routing.from_counts(counts, n_partitions, home_targets(n_groups, n_partitions))
    items = kept.select("group", "doc_index", "n_tokens").mapInArrow(rnd.route_documents(routing), spark_ddl(ITEM))
    n_items = int(counts.sum())
    result = PlanResult(None, 0, n_partitions, n_items=n_items)
    finals_by_round, packed_rounds = [], []
    n_targets, threshold, stalled = n_partitions, fill_threshold, False
    while True:
        t0 = time.perf_counter()
        packed = (exact_partitions(items, n_targets, "target").mapInArrow(rnd.pack(threshold), spark_ddl(PACKED))
                  .persist(StorageLevel.MEMORY_AND_DISK))
        result.cached.append(packed)
        finals, residue, (moved, moved_tokens) = _round_figures(packed, seq_len, n_buckets)
        finals_by_round.append([finals.get(p, 0) for p in range(n_targets)])
        packed_rounds.append(packed)
        result.moved_segments += moved
        result.moved_tokens += moved_tokens
        left = sum(residue.values())
        log.info("plan round %d: %d partitions, %d sequences final, %d items left (%.1fs)",
                 len(packed_rounds) - 1, n_targets, sum(finals.values()), left, time.perf_counter() - t0)
        if len(packed_rounds) == 1:
            result.residual_items = left
        if left == 0:
            break
        stalled = len(packed_rounds) > 1 and left > n_items // 2
        n_sources, n_items = n_targets, left
        n_targets, threshold = merge_round(left, merge_items, fill_threshold, stalled)
        routing = Routing.from_counts(_counts_matrix(residue, n_sources, width), n_targets)
        items = (packed.filter(~F.col("final")).select("group", "doc_index", "chunk", "length", "part")
                 .mapInArrow(rnd.route_residue(routing), spark_ddl(ITEM)))
    offsets = sequence_offsets([n for counts in finals_by_round for n in counts])
    result.n_sequences = int(sum(sum(c) for c in finals_by_round))
    result.residual_sequences = result.n_sequences - sum(finals_by_round[0])
    result.merge_rounds = len(packed_rounds) - 1
    keys, i = [], 0
    for stage, counts in enumerate(finals_by_round):
        for part in range(len(counts)):
            keys.append((stage, part, int(offsets[i])))
            i += 1
    first_ids = spark.createDataFrame(keys, "stage int, part int, first_id bigint")
    finals_df = None
    for stage, packed in enumerate(packed_rounds):
        rows = packed.filter(F.col("final")).withColumn("stage", F.lit(stage))
        finals_df = rows if finals_df is None else finals_df.unionByName(rows)
    result.orders = as_orders(finals_df.join(F.broadcast(first_ids), ["stage", "part"]), PLAN,
                              seq_id=F.col("first_id") + F.col("rank"),
                              **{c: F.col(c) for c in ("group", "doc_index", "chunk", "slot", "local")})
    return result
