"""One group, or one packing partition, per task: partition ``p`` holds exactly the rows whose key is ``p``.

Spark's ``repartition(n, col)`` sends a row to ``pmod(hash(col), n)``, so equal keys meet
but two keys may share a task while another task is empty: a stage then takes twice
as long as it should. Here every target ``p`` in ``0..n-1`` is given a stand-in key that
Spark's own ``hash`` sends to partition ``p``, and rows are repartitioned by that key
(looked up in an array literal: no join, no broadcast). Spark's own partitioner does the
work; adaptive execution keeps an explicit partition count as it is.

The stand-in keys are found with numpy's copy of Spark's hash (Murmur3, x86 32-bit, seed 42)
and then checked by Spark itself, on the driver without a Spark job (a projection over a
local relation is evaluated by the optimizer), so they hold for any Spark version: a
Spark whose hash differed would be searched directly instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

_KEYS: dict[int, list[int]] = {}
_SEED = 42


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _mix(h: np.ndarray, k: np.ndarray) -> np.ndarray:
    k = _rotl(k * np.uint32(0xCC9E2D51), 15) * np.uint32(0x1B873593)
    return _rotl(h ^ k, 13) * np.uint32(5) + np.uint32(0xE6546B64)


def spark_hash_long(values: np.ndarray) -> np.ndarray:
    """Spark's ``hash()`` of bigint values (Murmur3_x86_32.hashLong, seed 42), as int32."""
    v = np.asarray(values, np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        h = _mix(np.full(v.shape, _SEED, np.uint32), (v & np.uint64(0xFFFFFFFF)).astype(np.uint32))
        h = _mix(h, (v >> np.uint64(32)).astype(np.uint32)) ^ np.uint32(8)
        h = (h ^ (h >> np.uint32(16))) * np.uint32(0x85EBCA6B)
        h = (h ^ (h >> np.uint32(13))) * np.uint32(0xC2B2AE35)
        return (h ^ (h >> np.uint32(16))).view(np.int32)


def _first_keys(candidates: np.ndarray, targets: np.ndarray, n: int) -> np.ndarray:
    """For each target 0..n-1, the smallest candidate sent there (-1 where none is)."""
    keys = np.full(n, -1, np.int64)
    order = np.lexsort((candidates, targets))
    first = np.flatnonzero(np.diff(targets[order], prepend=-1) != 0)
    keys[targets[order][first]] = candidates[order][first]
    return keys


def _spark_targets(spark: SparkSession, keys: np.ndarray, n: int) -> np.ndarray:
    """``pmod(hash(key), n)`` as Spark computes it, without a Spark job."""
    local = spark.createDataFrame(pa.table({"_key": pa.array(keys, pa.int64())}))
    rows = local.select(F.expr(f"pmod(hash(_key), {n})").cast("int").alias("_t")).collect()
    return np.array([r["_t"] for r in rows], np.int64)


def _stand_in_keys(spark: SparkSession, n: int) -> list[int]:
    """The key of every target: ``pmod(hash(keys[p]), n) == p`` for p in 0..n-1."""
    if n not in _KEYS:
        candidates = np.arange(64 * n, dtype=np.int64)
        keys = _first_keys(candidates, np.mod(spark_hash_long(candidates), n), n)
        if (keys < 0).any() or not np.array_equal(_spark_targets(spark, keys, n), np.arange(n)):
            keys = _first_keys(candidates, _spark_targets(spark, candidates, n), n)  # Spark hashes otherwise
        if (keys < 0).any():
            raise RuntimeError(f"no stand-in partition key for {int((keys < 0).sum())} of {n} partitions")
        _KEYS[n] = keys.tolist()
    return _KEYS[n]


def exact_partitions(df: DataFrame, n: int, column: str) -> DataFrame:
    """``df`` in ``n`` partitions, the rows with ``column == p`` (0 <= p < n) in partition ``p``.

    One partition (a small input, the last merge round) needs no shuffle: the rows are
    coalesced into one task, which saves a Spark job and a shuffle per use."""
    if n == 1:
        return df.coalesce(1)
    keys = F.lit(_stand_in_keys(df.sparkSession, n)).cast("array<bigint>")
    return df.repartition(n, F.element_at(keys, F.col(column).cast("int") + 1))


def map_slices(spark: SparkSession, items: list, n: int, fn: Callable[[int, list], Iterator[pa.RecordBatch]],
               schema: str) -> DataFrame:
    """``fn(i, items[i::n])`` in task ``i`` of ``n``: work over a list the driver holds (input
    groups, written files) in one Spark job. The list is broadcast; a DataFrame made from a
    Python list would instead cost a Python task to unpickle it and a shuffle to spread it."""
    shared = spark.sparkContext.broadcast(items)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            for i in batch.column(0).to_pylist():
                yield from fn(i, shared.value[i::n])

    return spark.range(0, n, 1, n).mapInArrow(run, schema)
