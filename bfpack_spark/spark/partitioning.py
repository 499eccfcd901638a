"""One group, or one packing partition, per task: partition ``p`` holds exactly the rows whose key is ``p``.

Spark's ``repartition(n, col)`` sends a row to ``pmod(hash(col), n)``, so equal keys meet
but two keys may share a task while another task is empty: a stage then takes twice
as long as it should. Here every target ``p`` in ``0..n-1`` is given a stand-in key that
Spark's own ``hash`` sends to partition ``p``, and rows are repartitioned by that key
(looked up in an array literal: no join, no broadcast). Spark's own partitioner does the
work; adaptive execution keeps an explicit partition count as it is.

The stand-in keys are found with numpy's copy of Spark's hash (Murmur3, x86 32-bit, seed 42),
once checked against Spark's own on a few values, on the driver without a Spark job; a
Spark whose hash differed would have its keys searched by a Spark job instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from bfpack_spark.io.store import retry

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


#: values on which numpy's hash is checked against Spark's: small, negative, and both words set
_CHECKED = np.array([*range(-64, 64), 2**31 - 1, 2**31, -2**31, 2**32 + 5, 2**62 + 3, -2**63, 2**63 - 1],
                    np.int64)
@functools.lru_cache(maxsize=1)
def _hash_agrees(spark: SparkSession) -> bool:
    """Whether :func:`spark_hash_long` is this Spark's ``hash``, asked of Spark on the driver
    once per session: an inline table is a local relation, whose projection the optimizer
    evaluates (no job)."""
    values = ",".join(f"({v}L)" for v in _CHECKED.tolist())
    rows = spark.sql(f"SELECT hash(k) AS h FROM VALUES {values} AS t(k)").collect()
    return [r["h"] for r in rows] == spark_hash_long(_CHECKED).tolist()


def _searched_by_spark(spark: SparkSession, n: int) -> np.ndarray:
    """The stand-in keys found by a Spark job (for a Spark whose hash is not numpy's copy)."""
    found = (spark.range(0, 64 * n)
             .select(F.expr(f"pmod(hash(id), {n})").cast("int").alias("_target"), F.col("id").alias("_key"))
             .groupBy("_target").agg(F.min("_key").alias("_key")).collect())
    keys = np.full(n, -1, np.int64)
    for r in found:
        keys[r["_target"]] = r["_key"]
    return keys


def _stand_in_keys(spark: SparkSession, n: int) -> list[int]:
    """The key of every target: ``pmod(hash(keys[p]), n) == p`` for p in 0..n-1."""
    if n not in _KEYS:
        if _hash_agrees(spark):
            candidates = np.arange(64 * n, dtype=np.int64)
            keys = _first_keys(candidates, np.mod(spark_hash_long(candidates), n), n)
        else:
            keys = _searched_by_spark(spark, n)
        if (keys < 0).any():
            raise RuntimeError(f"no stand-in partition key for {int((keys < 0).sum())} of {n} partitions")
        _KEYS[n] = keys.tolist()
    return _KEYS[n]


def exact_partitions(df: DataFrame, n: int, column: str) -> DataFrame:
    """``df`` in ``n`` partitions, the rows with ``column == p`` in partition ``p``; every
    ``column`` value must be in 0..n-1 (a task fails on any other, null included).

    One partition (a small input, the last merge round) needs no shuffle: the rows are
    coalesced into one task, which saves a Spark job and a shuffle per use. The keys are one
    SQL array literal (one call into the JVM, whatever ``n``); bigint, as Spark hashes an int
    otherwise."""
    if n == 1:
        return df.coalesce(1)
    keys = ",".join(map(str, _stand_in_keys(df.sparkSession, n)))
    return df.repartition(n, F.expr(
        f"CASE WHEN `{column}` >= 0 AND `{column}` < {n} "
        f"THEN element_at(cast(array({keys}) AS array<bigint>), cast(`{column}` AS int) + 1) "
        f"ELSE raise_error(concat('{column} ', coalesce(cast(`{column}` AS string), 'null'), "
        f"' is not a partition of 0..{n - 1}')) END"))


def map_slices(spark: SparkSession, items: list, n: int, fn: Callable[[int, list], Iterator[pa.RecordBatch]],
               schema: str) -> DataFrame:
    """``fn(i, items[i::n])`` in task ``i`` of ``n`` (1 <= n; strided slices, empty where
    ``n > len(items)``): work over a list the driver holds (input groups, written files) in one
    Spark job. The list is broadcast; a DataFrame made from a Python list would instead cost a
    Python task to unpickle it and a shuffle to spread it."""
    if n < 1:
        raise ValueError(f"map_slices needs at least one task, not {n}")
    shared = spark.sparkContext.broadcast(items)

    def run(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            for i in batch.column(0).to_pylist():
                yield from fn(i, shared.value[i::n])

    return spark.range(0, n, 1, n).mapInArrow(counted(run), schema)


#: the accumulator of the run under way, which tasks add their retried requests to (driver only)
_retries = None


def count_retries(spark: SparkSession) -> Callable[[], int]:
    """Start counting the object-store requests retried from now on, in tasks and on the driver;
    returns the count so far. The tasks of :func:`map_slices` and of functions :func:`counted`
    wraps add theirs."""
    global _retries
    acc = _retries = spark.sparkContext.accumulator(0)
    start = retry.retried()
    return lambda: acc.value + retry.retried() - start


def counted(fn: Callable[[Iterable[pa.RecordBatch]], Iterator[pa.RecordBatch]]):
    """``fn`` (a ``mapInArrow`` function) adding the requests its task retried to the run's count."""
    acc = _retries
    if acc is None:
        return fn

    @functools.wraps(fn)
    def task(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        before = retry.retried()
        try:
            yield from fn(batches)
        finally:
            acc.add(retry.retried() - before)

    return task
