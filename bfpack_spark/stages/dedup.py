"""Stage 2, duplicates: with ``quality.duplicate_ids: skip`` a document whose id an earlier one
has is rejected, and the first copy is packed.

"Earlier" is canonical order (group, then position in the group: files by name, rows in
file order), so the same copy wins whatever the partitioning. This is a window over the
ids, a shuffle of (id, position) pairs with no token in them; the driver gets only
per-group counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark import StorageLevel
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from bfpack_spark.spark.partitioning import exact_partitions


@dataclass
class Duplicates:
    """The documents to drop, as a DataFrame (cached), and how many per group."""

    drops: DataFrame | None          # doc_id, group, doc_index, n_tokens, first_source, first_row
    count: int
    tokens_by_group: dict[int, int]  # tokens of dropped documents, per group (for concat offsets)

    def unpersist(self) -> None:
        if self.drops is not None:
            self.drops.unpersist()


def find_duplicates(docs: DataFrame, policy: str) -> Duplicates:
    """``docs``: one row per packable document (doc_id, group, doc_index, n_tokens, source, row)."""
    if policy == "keep":
        return Duplicates(None, 0, {})
    first = Window.partitionBy("doc_id").orderBy("group", "doc_index")
    copies = docs.select(
        "doc_id", "group", "doc_index", "n_tokens",
        F.row_number().over(first).alias("copy"),
        F.first("source").over(first).alias("first_source"),
        F.first("row").over(first).alias("first_row"),
    )
    drops = copies.filter("copy > 1").drop("copy").persist(StorageLevel.MEMORY_AND_DISK)
    per_group = drops.groupBy("group").agg(F.count("*").alias("n"), F.sum("n_tokens").alias("tokens")).collect()
    if not per_group:
        drops.unpersist()
        return Duplicates(None, 0, {})
    return Duplicates(drops, sum(r["n"] for r in per_group), {r["group"]: r["tokens"] for r in per_group})


def without_duplicates(docs: DataFrame, dups: Duplicates, n_groups: int) -> DataFrame:
    """The packable documents, each group's in partition ``group`` (cached when rebuilt)."""
    if dups.drops is None:
        return docs  # the read stage's partitioning: group g in partition g
    kept = docs.join(dups.drops.select("group", "doc_index"), ["group", "doc_index"], "left_anti")
    return exact_partitions(kept, n_groups, "group").persist(StorageLevel.MEMORY_AND_DISK)
