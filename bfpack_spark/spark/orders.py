"""What the assembly of each group is told (``ORDERS`` rows), made from the stages' DataFrames: the
plan's packed bundles and the duplicates' drops. Here, so that the plan and the assembly both use it
without the plan reaching the later stage."""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from bfpack_spark.schemas import ORDERS, spark_types


def as_orders(df: DataFrame, kind: int, **columns) -> DataFrame:
    """``df`` as ORDERS rows of ``kind``: the given columns, nulls elsewhere."""
    types = spark_types(ORDERS)
    columns["kind"] = F.lit(int(kind))
    return df.select(*[columns.get(n, F.lit(None)).cast(types[n]).alias(n) for n in ORDERS.names])
