"""The plan's rounds, in Spark tasks: items dealt to partitions by length bucket, packed by BFD
in each, the sequences not filled enough dealt again, until every sequence is final.

The steps are those of :mod:`bfpack_spark.packing.plan` (read its docstring first):
the driver turns each round's counts per (source, length bucket) into a
:class:`~bfpack_spark.packing.plan.Routing`, tasks deal their items to the round's
partitions, and one task per partition packs them by BFD. Sequences filled to the
threshold are final; the rest go to the next round. The driver holds counts per
(source, bucket) and per partition, never a row per document; items only where a round
leaves at most :data:`DRIVER_ITEMS` of them (whatever the corpus), and if they make a last
round it packs them itself: a Spark job costs more than BFD over that many lengths.
Items travel in *bundles* (one row of arrays per source and target, or per partition and
group): Spark moves a few long arrays far more cheaply than one row per item.

:func:`routed_plan` is the plan whose first round is routed too; :mod:`.plan` chooses it where the
read's own first round does not serve.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import reduce

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from bfpack_spark.config import PackingConfig
from bfpack_spark.packing.chunking import chunk_documents
from bfpack_spark.packing.plan import (
    Routing,
    home_targets,
    length_buckets,
    merge_round,
    pack_partition,
    round_threshold,
    sequence_offsets,
)
from bfpack_spark.schemas import BUNDLE, PACKED, Order, numbers_array, numbers_of, spark_ddl, spark_types
from bfpack_spark.spark.orders import as_orders
from bfpack_spark.spark.partitioning import exact_partitions

log = logging.getLogger(__name__)


@dataclass
class PlanResult:
    """The plan: every round's packed bundles (``orders``, as PLAN orders; None where no round has
    any: concat, or an in-place plan that left nothing) and its figures.

    An item's sequence id is ``first_ids[stage][part] + rank`` for the round ``stage`` in
    which its sequence became final (O(partitions) numbers, computed on the driver). An
    in-place round 0 has one partition per group and no bundles: the assembly packs it again.
    """

    orders: DataFrame | None
    n_sequences: int
    n_partitions: int
    first_ids: list[np.ndarray] = field(default_factory=list)
    n_items: int = 0
    residual_items: int = 0
    residual_sequences: int = 0
    merge_rounds: int = 0
    moved_segments: int = 0
    moved_tokens: int = 0
    rounds: list[DataFrame] = field(default_factory=list)  # each round's packed bundles (cached)
    cached: list[DataFrame] = field(default_factory=list)  # what else the plan cached (released with it)
    last_round: DataFrame | None = None  # a last round packed on the driver (a small local table)
    # how round 0 ran: "in place" (each group packed where it was read: no order travels), "driver"
    # (one partition, packed by the driver), "routed" (Spark tasks); None: no plan (concat)
    first_round: str | None = None

    @property
    def in_place(self) -> bool:
        return self.first_round == IN_PLACE

    def unpersist(self) -> None:
        for df in self.rounds + self.cached:
            df.unpersist()


def _table(batches) -> pa.Table | None:
    """A task's input batches as one table, or None when it has no row."""
    batches = list(batches)
    table = pa.Table.from_batches(batches) if batches else None
    return table if table is not None and table.num_rows else None


def _flat(table: pa.Table, schema: pa.Schema, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The number columns of a table of bundles, each flattened to one array."""
    return {c: numbers_of(table, schema, c)[0] for c in columns}


def _canonical(items: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    order = np.lexsort((items["chunk"], items["doc_index"], items["group"]))
    return {c: v[order] for c, v in items.items()}


def _bundles(items: dict[str, np.ndarray], key: np.ndarray, key_name: str, schema: pa.Schema) -> dict[str, pa.Array]:
    """Columns of one row per distinct ``key`` (non-empty): the key, and the items' columns as
    lists (items in their order within a key)."""
    order = np.argsort(key, kind="stable")
    key = key[order]
    starts = np.flatnonzero(np.diff(key, prepend=key[0] - 1) != 0)
    offsets = np.append(starts, key.shape[0])
    columns = {key_name: pa.array(key[starts], pa.int32())}
    for name, values in items.items():
        columns[name] = numbers_array(schema, name, offsets, values[order])
    return columns


class Round:
    """The tasks of a packing round: route, pack (pickled into Spark tasks)."""

    def __init__(self, seq_len: int, n_buckets: int, max_segments: int | None = None):
        self.seq_len, self.n_buckets, self.max_segments = seq_len, n_buckets, max_segments

    def route_documents(self, routing: Routing):
        """Stage 0: cut each group's documents into items and deal them to the partitions."""
        seq_len = self.seq_len

        def route(batches) -> Iterator[pa.RecordBatch]:
            table = _table(batches)
            if table is None:
                return
            for g in np.unique(table.column("group").to_numpy()):
                docs = table.filter(pc.equal(table.column("group"), g)).sort_by("doc_index")
                chunks = chunk_documents(docs.column("n_tokens").to_numpy(), seq_len)
                items = {"group": np.full(len(chunks), g, np.int32),
                         "doc_index": docs.column("doc_index").to_numpy()[chunks.doc],
                         "chunk": chunks.index, "length": chunks.length}
                yield self._dealt(int(g), items, routing)
        return route

    def route_residue(self, routing: Routing):
        """A merge round: deal each partition's residue (items not yet final) to the next round."""
        def route(batches) -> Iterator[pa.RecordBatch]:
            table = _table(batches)
            if table is None:
                return
            for p in np.unique(table.column("part").to_numpy()):
                bundles = table.filter(pc.equal(table.column("part"), p))
                items = _flat(bundles, PACKED, ("doc_index", "chunk", "length", "rank"))
                items["group"] = np.repeat(bundles.column("group").to_numpy(),
                                           np.diff(numbers_of(bundles, PACKED, "rank")[1]))
                left = items.pop("rank") < 0
                if left.any():
                    yield self._dealt(int(p), _canonical({c: v[left] for c, v in items.items()}), routing)
        return route

    def route_residue_rows(self, routing: Routing):
        """The first merge round after an in-place one: deal each group's residue (its RESIDUE row,
        the chunks in canonical order) to the round's partitions."""
        def route(batches) -> Iterator[pa.RecordBatch]:
            table = _table(batches)
            if table is None:
                return
            for g, info in zip(table.column("group").to_pylist(), table.column("info").to_pylist()):
                items = {name: np.asarray(values, np.int64) for name, values in json.loads(info).items()}
                if items["length"].shape[0]:
                    items["group"] = np.full(items["length"].shape[0], g, np.int32)
                    yield self._dealt(g, items, routing)
        return route

    def _dealt(self, source: int, items: dict[str, np.ndarray], routing: Routing) -> pa.RecordBatch:
        length = items["length"]
        target = routing.targets(source, length, length_buckets(length, self.seq_len, self.n_buckets))
        return pa.RecordBatch.from_pydict(_bundles(items, target, "target", BUNDLE), schema=BUNDLE)

    def pack(self, threshold: float, carry: int = 0):
        """Pack each partition; one whose residue is at most ``carry`` items also hands it over
        whole with its figures, so that the driver can pack a last round that small."""
        seq_len, n_buckets, max_segments = self.seq_len, self.n_buckets, self.max_segments

        def pack(batches) -> Iterator[pa.RecordBatch]:
            table = _table(batches)
            if table is None:
                return
            for p in np.unique(table.column("target").to_numpy()):
                items = _canonical(_flat(table.filter(pc.equal(table.column("target"), p)), BUNDLE,
                                         ("group", "doc_index", "chunk", "length")))
                packed = pack_partition(items["length"], items["group"], seq_len, threshold, max_segments)
                moved = packed.final & ~packed.local
                left = np.bincount(length_buckets(items["length"][~packed.final], seq_len, n_buckets),
                                   minlength=min(n_buckets, seq_len))
                buckets = np.flatnonzero(left)
                columns = _bundles({"doc_index": items["doc_index"], "chunk": items["chunk"],
                                    "length": items["length"], "rank": packed.rank, "slot": packed.slot,
                                    "local": packed.local}, items["group"], "group", PACKED)
                n = len(columns["group"])
                columns["part"] = pa.array(np.full(n, p, np.int32))
                figures = {"n_final": packed.n_final, "moved": int(moved.sum()),  # on the first bundle only
                           "moved_tokens": int(items["length"][moved].sum()),
                           "residue_buckets": buckets.tolist(), "residue_counts": left[buckets].tolist()}
                for name, value in figures.items():
                    columns[name] = pa.array([value] + [None] * (n - 1), PACKED.field(name).type)
                left = np.flatnonzero(~packed.final)
                for name in _LEFT:
                    values = items[name.removeprefix("left_")][left]
                    columns[name] = pa.concat_arrays([
                        numbers_array(PACKED, name, np.array([0, left.shape[0]]), values)
                        if left.shape[0] <= carry else pa.nulls(1, pa.binary()), pa.nulls(n - 1, pa.binary())])
                yield pa.RecordBatch.from_pydict(columns, schema=PACKED)
        return pack


IN_PLACE, DRIVER, ROUTED = "in place", "driver", "routed"
_PLAN_COLUMNS = ("group", "part", "doc_index", "chunk", "rank", "slot", "local")
_LEFT = tuple(name for name in PACKED.names if name.startswith("left_"))
#: The driver packs at most this many items itself (10 MB as arrays, a few tens of MB while the read's
#: JSON hands them over; whatever the corpus): a
#: whole plan one task could hold, or the last round of one (the few residual items a plan usually
#: ends with). A Spark job costs more than BFD over that many lengths.
DRIVER_ITEMS = 262_144


def _round_figures(packed: DataFrame) -> tuple[dict, dict, tuple[int, int], dict[str, np.ndarray] | None]:
    """Per partition: final sequences; per (partition, bucket): residual items; the moved
    (non-local) final items and their tokens; and the residual items themselves, where every
    partition handed its residue over (else None). One row per partition."""
    finals, residue, moved, moved_tokens = {}, {}, 0, 0
    rows = packed.filter(F.col("n_final").isNotNull()).select(
        "part", "n_final", "moved", "moved_tokens", "residue_buckets", "residue_counts", *_LEFT).collect()
    for r in rows:
        finals[r["part"]] = r["n_final"]
        moved += r["moved"]
        moved_tokens += r["moved_tokens"]
        for b, n in zip(r["residue_buckets"], r["residue_counts"]):
            residue[(r["part"], b)] = n
    carried = None
    if all(r["left_length"] is not None for r in rows):
        left = pa.table({name: pa.array([r[name] for r in rows], pa.binary()) for name in _LEFT})
        carried = {name.removeprefix("left_"): numbers_of(left, PACKED, name)[0] for name in _LEFT}
    return finals, residue, (moved, moved_tokens), carried


def _driver_round(spark, items: dict[str, np.ndarray], rnd: Round,
                  threshold: float) -> tuple[DataFrame, int, int, int]:
    """A last round (one partition, so every sequence is final) packed on the driver, exactly as its
    task would have: its bundles as a small DataFrame, its sequences, moved items and moved tokens."""
    items = _canonical(items)
    packed = pack_partition(items["length"], items["group"], rnd.seq_len, threshold, rnd.max_segments)
    if not packed.final.all():
        raise RuntimeError("a last plan round left sequences that are not final")
    columns = _bundles({"doc_index": items["doc_index"], "chunk": items["chunk"], "rank": packed.rank,
                        "slot": packed.slot, "local": packed.local}, items["group"], "group", PACKED)
    names = ["part", *columns]
    columns["part"] = pa.array(np.zeros(len(columns["group"]), np.int32))
    # through pandas, so that Spark takes it as Arrow in the JVM: a list of rows would cost a job of
    # Python tasks (a second in a fresh process) to unpickle
    df = spark.createDataFrame(pa.table(columns).select(names).to_pandas(),
                               ", ".join(f"`{c}` {spark_types(PACKED)[c]}" for c in names))
    moved = ~packed.local
    return df, packed.n_final, int(moved.sum()), int(items["length"][moved].sum())


def first_ids(finals_by_round: list[list[int]]) -> list[np.ndarray]:
    """First sequence id of each partition, per round."""
    first = sequence_offsets([n for finals in finals_by_round for n in finals])
    bounds = np.cumsum([0] + [len(f) for f in finals_by_round])
    return [first[bounds[r]:bounds[r + 1]] for r in range(len(finals_by_round))]


def counts_matrix(counts: dict, n_sources: int, n_buckets: int) -> np.ndarray:
    matrix = np.zeros((n_sources, n_buckets), np.int64)
    for (s, b), n in counts.items():
        matrix[s, b] += n
    return matrix


@dataclass(frozen=True)
class Rounds:
    """How rounds are packed: the tasks, the fill threshold, the largest partition of a merge round,
    the largest round the driver packs itself."""

    rnd: Round
    fill_threshold: float
    merge_items: int
    driver_items: int

    @classmethod
    def of(cls, packing: PackingConfig, driver_items: int) -> Rounds:
        return cls(Round(packing.seq_len, packing.length_buckets, packing.max_segments_per_sequence),
                   packing.residual_fill, packing.merge_items_per_partition, driver_items)


def pack_rounds(spark, result: PlanResult, how: Rounds, finals_by_round: list[list[int]], *,
                items: DataFrame | None, n_targets: int, threshold: float,
                carried: dict[str, np.ndarray] | None = None, n_items: int = 0) -> None:
    """Pack rounds until every item is final, starting with round ``len(finals_by_round)``: its
    ``items`` (BUNDLE rows) dealt to ``n_targets`` partitions, or ``carried`` (the items themselves,
    one partition) packed by the driver; then ``result`` is complete."""
    rnd, width = how.rnd, min(how.rnd.n_buckets, how.rnd.seq_len)
    while True:
        t0 = time.perf_counter()
        stage = len(finals_by_round)
        if carried is not None:  # one partition, small: packed here
            result.last_round, n_final, moved, moved_tokens = _driver_round(spark, carried, rnd, threshold)
            finals_by_round.append([n_final])
            result.moved_segments += moved
            result.moved_tokens += moved_tokens
            log.info("plan round %d: %d items packed by the driver into %d sequences (%.1fs)",
                     stage, carried["length"].shape[0], n_final, time.perf_counter() - t0)
            break
        assert items is not None
        packed = (exact_partitions(items, n_targets, "target")
                  .mapInArrow(rnd.pack(threshold, how.driver_items // n_targets), spark_ddl(PACKED))
                  .persist(StorageLevel.MEMORY_AND_DISK))
        result.rounds.append(packed)
        finals, residue, (moved, moved_tokens), carried = _round_figures(packed)
        finals_by_round.append([finals.get(p, 0) for p in range(n_targets)])
        result.moved_segments += moved
        result.moved_tokens += moved_tokens
        left = sum(residue.values())
        log.info("plan round %d: %d partitions, %d sequences final, %d items left (%.1fs)",
                 stage, n_targets, sum(finals.values()), left, time.perf_counter() - t0)
        if stage == 0:
            result.residual_items = left
        if left == 0:
            break
        stalled = stage > 0 and left > n_items // 2
        n_sources, n_items = n_targets, left
        n_targets, threshold = merge_round(left, how.merge_items, how.fill_threshold, stalled)
        if n_targets > 1:
            carried = None
        if carried is None:
            routing = Routing.from_counts(counts_matrix(residue, n_sources, width), n_targets)
            items = packed.mapInArrow(rnd.route_residue(routing), spark_ddl(BUNDLE))
    finish(result, finals_by_round)


def finish(result: PlanResult, finals_by_round: list[list[int]]) -> None:
    """Sequence ids, counts and orders of a plan whose rounds are all packed (the rounds with a
    DataFrame are the last ones: an in-place first round has none)."""
    result.first_ids = first_ids(finals_by_round)
    result.n_sequences = int(sum(map(sum, finals_by_round)))
    result.residual_sequences = result.n_sequences - sum(finals_by_round[0])
    result.merge_rounds = len(finals_by_round) - 1
    rounds = result.rounds + ([result.last_round] if result.last_round is not None else [])
    first = len(finals_by_round) - len(rounds)
    if rounds:
        result.orders = reduce(DataFrame.unionByName, [
            as_orders(packed, Order.PLAN, stage=F.lit(first + i), **{c: F.col(c) for c in _PLAN_COLUMNS})
            for i, packed in enumerate(rounds)])


def routed_plan(kept: DataFrame, counts: np.ndarray, n_partitions: int, how: Rounds) -> PlanResult:
    """Best-fit plan of the packable documents ``kept`` (DOC rows, each group's in one partition),
    its first round routed to ``n_partitions``; ``counts[g, b]``: the chunks of group ``g``'s documents
    in length bucket ``b``; a last round of one partition and at most ``how.driver_items`` items is
    packed on the driver (the same plan, one Spark job less)."""
    rnd = how.rnd
    routing = Routing.from_counts(counts, n_partitions, home_targets(counts.shape[0], n_partitions))
    items = (kept.select("group", "doc_index", "n_tokens")
             .mapInArrow(rnd.route_documents(routing), spark_ddl(BUNDLE)))
    n_items = int(counts.sum())
    result = PlanResult(None, 0, n_partitions, n_items=n_items, first_round=ROUTED)
    pack_rounds(kept.sparkSession, result, how, [], items=items, n_targets=n_partitions,
                threshold=round_threshold(n_partitions, how.fill_threshold), n_items=n_items)
    return result
