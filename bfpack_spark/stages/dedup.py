"""Stage 2, duplicates: with ``quality.duplicate_ids: skip`` a document whose id an earlier one
has is rejected, and the first copy is packed.

"Earlier" is canonical order (group, then position in the group: files by name, rows in
file order), so the same copy wins whatever the partitioning. Not a window over all the
ids: one aggregation over 64-bit hashes of the ids finds the hashes seen more than once,
and only the documents with those hashes are compared by id (a broadcast join when they
are few). No token moves; the driver gets per-group counts.

A run appended to an output root also rejects every document whose id an earlier committed
run packed: a join of this run's documents with the ``documents`` table (Spark reads it, no
list of ids is collected).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from bfpack_spark.io.store.fs import read_parquet
from bfpack_spark.io.tables.read import delta_table
from bfpack_spark.packing.plan import item_histogram
from bfpack_spark.schemas import spark_ddl
from bfpack_spark.spark.partitioning import exact_partitions, map_slices

_SUMMARY = pa.schema([("group", pa.int32()), ("n", pa.int64()), ("tokens", pa.int64()),
                      ("items", pa.list_(pa.int64()))])
#: Below this many repeated id hashes, their documents are found with a broadcast join.
_BROADCAST = 1_000_000
#: Below this many documents, a run's ids (strings of any length) are broadcast to the join with earlier runs'.
_BROADCAST_IDS = 100_000


@dataclass
class Duplicates:
    """The documents to drop, as a DataFrame (cached), and per group how many and what they held."""

    drops: DataFrame | None          # doc_id, group, doc_index, n_tokens, first_source, first_row, first_run
    count: int = 0
    tokens_by_group: dict[int, int] = field(default_factory=dict)
    items_by_group: dict[int, np.ndarray] = field(default_factory=dict)  # chunks per length bucket

    def unpersist(self) -> None:
        if self.drops is not None:
            self.drops.unpersist()


_DROPS = ("doc_id", "group", "doc_index", "n_tokens", "first_source", "first_row", "first_run")


def earlier_documents(spark, documents_uri: str, runs: list[str], docs: DataFrame, n_docs: int) -> DataFrame | None:
    """The ids of ``docs`` (this run's ``n_docs`` documents) that ``runs`` (committed runs of the output
    root) packed, each with where it was first packed: (doc_id, first_source, first_row); None when
    there are no earlier documents.

    Tasks read the table's files with pyarrow (any store, no JVM connector needed); the
    driver holds only the file list. Only the earlier rows whose id this run has are grouped
    (a semi-join: a broadcast of this run's ids when they are few, as in an incremental run, so the
    earlier rows are filtered where they are read instead of shuffled)."""
    table = delta_table(documents_uri) if runs else None
    files = table.file_uris() if table is not None else []
    if not files:
        return None
    wanted = pa.array(runs, pa.string())

    def read(_, uris: list[str]) -> Iterator[pa.RecordBatch]:
        for uri in uris:
            rows = read_parquet(uri, ["doc_id", "source", "row", "run_id"])
            yield from rows.filter(pc.is_in(rows.column("run_id"), wanted)).to_batches()

    n = min(len(files), spark.sparkContext.defaultParallelism)
    rows = map_slices(spark, files, n, read, "doc_id string, source string, row bigint, run_id string")
    ids = docs.select("doc_id")
    rows = rows.join(F.broadcast(ids) if n_docs <= _BROADCAST_IDS else ids, "doc_id", "left_semi")
    first = F.min(F.struct("run_id", "source", "row")).alias("first")
    return rows.groupBy("doc_id").agg(first).select(
        "doc_id", F.col("first.source").alias("first_source"), F.col("first.row").alias("first_row"),
        F.col("first.run_id").alias("first_run"))


def _within_run(hashed: DataFrame) -> tuple[DataFrame | None, DataFrame | None]:
    """Later copies of an id within this run, and the repeated hashes they were found from,
    cached (the copies read them again, so the caller unpersists them once the copies are
    computed); both None when one aggregation over hashes finds no repeat."""
    repeated = hashed.groupBy("h").count().filter("count > 1").select("h").persist(StorageLevel.MEMORY_AND_DISK)
    if repeated.isEmpty():  # the usual case: one aggregation over 64-bit hashes (two Spark jobs), nothing else
        repeated.unpersist()
        return None, None
    n_repeated = repeated.count()  # from the cache
    copies = (hashed.join(F.broadcast(repeated) if n_repeated <= _BROADCAST else repeated, "h")
              .withColumn("position", F.col("group").cast("bigint") * (1 << 40) + F.col("doc_index")))
    copies = copies.join(copies.groupBy("doc_id").agg(F.min("position").alias("first")), "doc_id")
    firsts = copies.filter(F.col("position") == F.col("first")).select(
        "doc_id", F.col("source").alias("first_source"), F.col("row").alias("first_row"),
        F.lit(None).cast("string").alias("first_run"))
    return copies.filter(F.col("position") != F.col("first")).join(firsts, "doc_id").select(*_DROPS), repeated


def find_duplicates(docs: DataFrame, policy: str, seq_len: int, length_buckets: int,
                    earlier: DataFrame | None = None) -> Duplicates:
    """``docs``: one row per packable document (doc_id, group, doc_index, n_tokens, source, row);
    ``earlier``: ids earlier runs packed (:func:`earlier_documents`), all of whose copies drop."""
    if policy == "keep":
        return Duplicates(None)
    drops, repeated = _within_run(docs.withColumn("h", F.xxhash64("doc_id")))
    try:
        if earlier is not None:
            again = docs.join(earlier, "doc_id").select(*_DROPS)
            if drops is not None:  # a copy of an earlier run's id is that run's duplicate, not this run's
                drops = drops.join(again.select("group", "doc_index"), ["group", "doc_index"], "left_anti")
            drops = again if drops is None else drops.unionByName(again)
        if drops is None:
            return Duplicates(None)
        return _counted(drops.persist(StorageLevel.MEMORY_AND_DISK), seq_len, length_buckets)
    finally:
        if repeated is not None:
            repeated.unpersist()


def _counted(drops: DataFrame, seq_len: int, length_buckets: int) -> Duplicates:
    """The documents to drop (cached; computed here), with their counts per group."""

    def summarize(batches):
        for batch in batches:
            table = pa.Table.from_batches([batch])
            for g in np.unique(table.column("group").to_numpy()):
                mine = table.filter(pc.equal(table.column("group"), g)).column("n_tokens").to_numpy()
                yield pa.RecordBatch.from_pydict(
                    {"group": [int(g)], "n": [len(mine)], "tokens": [int(mine.sum())],
                     "items": [item_histogram(mine, seq_len, length_buckets).tolist()]}, schema=_SUMMARY)

    dups = Duplicates(drops)
    for r in drops.select("group", "n_tokens").mapInArrow(summarize, spark_ddl(_SUMMARY)).collect():
        g = r["group"]
        dups.count += r["n"]
        dups.tokens_by_group[g] = dups.tokens_by_group.get(g, 0) + r["tokens"]
        dups.items_by_group[g] = dups.items_by_group.get(g, 0) + np.array(r["items"], np.int64)
    if dups.count == 0:  # repeated hashes, but different ids
        drops.unpersist()
        return Duplicates(None)
    return dups


def without_duplicates(docs: DataFrame, dups: Duplicates, n_groups: int) -> DataFrame:
    """The packable documents, each group's in partition ``group`` (cached when rebuilt)."""
    if dups.drops is None:
        return docs  # the read stage's partitioning: group g in partition g
    kept = docs.join(dups.drops.select("group", "doc_index"), ["group", "doc_index"], "left_anti")
    return exact_partitions(kept, n_groups, "group").persist(StorageLevel.MEMORY_AND_DISK)
