"""Reading the output tables: a table's snapshot as a pyarrow dataset or a Spark DataFrame, one run's
stats row. Reading needs no lock and no commit: the readers see the files of one committed version."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from bfpack_spark.io.store import retry
from bfpack_spark.io.store.fs import delta_storage_options, filesystem, join
from bfpack_spark.schemas import stats_row_of


class DeltaError(RuntimeError):
    """A Delta table cannot be written or read as asked."""


def connector_available(spark) -> bool:
    """True when Delta's JVM connector (delta-spark) is on Spark's classpath."""
    try:
        spark._jvm.java.lang.Class.forName("io.delta.tables.DeltaTable")
        return True
    except Exception:
        return False


def delta_table(uri: str, version: int | None = None):
    """The Delta table at ``uri`` (with the run's storage options), or None where there is none."""
    from deltalake import DeltaTable

    options = delta_storage_options()

    def open_table():
        if not DeltaTable.is_deltatable(uri, storage_options=options):
            return None
        return DeltaTable(uri, version=version, storage_options=options)

    return retry.call(open_table, f"open {uri}")


def output_table(uri: str, version: int | None = None):
    """The Delta table at ``uri``, which must be one of an output root's tables."""
    table = delta_table(uri, version)
    if table is None:
        raise DeltaError(f"{uri} is not a Delta table: give the output root of a bfpack run")
    return table


def snapshot_dataset(uri: str, version: int | None = None) -> ds.Dataset | None:
    """The files of the table's snapshot as a pyarrow dataset (the reading path that exits cleanly),
    or None where there is no table."""
    table = delta_table(uri, version)
    return None if table is None else table_dataset(table)


def table_dataset(table) -> ds.Dataset:
    """The files of an opened Delta table's snapshot as a pyarrow dataset (with the table's
    columns, also when it has no file: a clean run's rejects)."""
    files = table.file_uris()
    fs = filesystem(files[0])[0] if files else pafs.LocalFileSystem()
    return ds.dataset([filesystem(f)[1] for f in files], filesystem=fs, format="parquet",
                      schema=None if files else pa.schema(table.schema().to_arrow()))


def read_table(spark, uri: str):
    """The current snapshot of a Delta table as a Spark DataFrame, with or without the connector."""
    if connector_available(spark):
        return spark.read.format("delta").load(uri)
    from pyspark.sql.types import StructType

    table = delta_table(uri)
    if table is None:
        raise DeltaError(f"{uri} is not a Delta table")
    schema = StructType.fromJson(json.loads(table.schema().to_json()))
    files = table.file_uris()
    if not files:
        return spark.createDataFrame([], schema)
    return spark.read.schema(schema).parquet(*files)


def stats_rows(root: str, columns: list[str]) -> list[dict]:
    """``columns`` of every committed run's ``stats`` row under the output root ``root`` (none: no table)."""
    dataset = snapshot_dataset(join(root, "stats"))
    return [] if dataset is None else dataset.to_table(columns=columns).to_pylist()


def read_stats_row(uri: str, run_id: str) -> dict:
    """The stats row of one run, read with pyarrow from the files of the table's snapshot."""
    dataset = snapshot_dataset(uri)
    rows = [] if dataset is None else dataset.to_table(filter=ds.field("run_id") == run_id).to_pylist()
    if not rows:
        raise DeltaError(f"{uri} holds no stats row of run {run_id}")
    return stats_row_of(rows[0])
