"""Delta output: Spark writes Parquet data files, then one atomic commit per table adds them.

Two ways to commit, same tables (schema, rows, one commit per table per run):

- ``deltalake`` (delta-rs, a PyPI package; needs no JVM connector): the files Spark
  wrote under the table directory are added by one ``AddAction`` commit;
- ``delta-spark`` (where Delta's JVM connector is on the classpath: EMR, Databricks):
  the staged files are written through ``format("delta")``, then removed.

Every commit carries the application transaction ``(bfpack:<run_id>, 0)``, so a
table already holding a run is recognized and never gets its rows twice. Files
written by an attempt that did not commit are never in the log, so readers never
see them; :meth:`DeltaOutput.clean_orphans` removes them.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import time
import uuid
from dataclasses import dataclass
from datetime import date, datetime

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bfpack_spark.io.files import filesystem, join

log = logging.getLogger(__name__)

APP_PREFIX = "bfpack:"
RETENTION_SECONDS = 7 * 24 * 3600
_ATTEMPT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*-[0-9a-f]{8}")


class DeltaError(RuntimeError):
    """A Delta table cannot be written or read as asked."""


def connector_available(spark) -> bool:
    """True when Delta's JVM connector (delta-spark) is on Spark's classpath."""
    try:
        spark._jvm.java.lang.Class.forName("io.delta.tables.DeltaTable")
        return True
    except Exception:
        return False


@dataclass(frozen=True)
class StagedTable:
    name: str
    uri: str          # table root
    directory: str    # relative directory under the table root holding this attempt's files
    schema_json: str  # Spark/Delta schema of the rows


def _json_value(v):
    if isinstance(v, (datetime, date)):
        return v.isoformat()
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v


def _commit_metadata(commit: dict) -> dict:
    """bfpack's keys of a commit: top-level custom metadata (delta-rs) or userMetadata JSON (delta-spark)."""
    meta = commit.get("userMetadata")
    meta = json.loads(meta) if isinstance(meta, str) and meta.startswith("{") else {}
    meta.update({k: v for k, v in commit.items() if k.startswith("bfpack.")})
    return meta


def nullable_schema_json(schema_json: str) -> str:
    """The schema with every field, element and value nullable: what Spark reads back from
    Parquet files, so both commit paths record the same table schema."""
    def relax(node):
        if isinstance(node, dict):
            for key in ("nullable", "containsNull", "valueContainsNull"):
                if key in node:
                    node[key] = True
            for value in node.values():
                relax(value)
        elif isinstance(node, list):
            for value in node:
                relax(value)
        return node

    return json.dumps(relax(json.loads(schema_json)), separators=(",", ":"))


def file_stats(fs: pafs.FileSystem, path: str) -> tuple[str, int]:
    """Delta ``stats`` JSON (record count, per-column min/max/null count) from a Parquet footer."""
    with fs.open_input_file(path) as fh:
        meta = pq.ParquetFile(fh).metadata
    mins: dict = {}
    maxs: dict = {}
    nulls: dict = {}
    for rg in range(meta.num_row_groups):
        group = meta.row_group(rg)
        for c in range(group.num_columns):
            col = group.column(c)
            name = col.path_in_schema
            if "." in name:  # nested (list) columns: no statistics in Delta
                continue
            st = col.statistics
            if st is None or not st.has_min_max:
                nulls[name] = nulls.get(name, 0) + (st.null_count if st is not None else 0)
                continue
            lo, hi = _json_value(st.min), _json_value(st.max)
            mins[name] = lo if name not in mins else min(mins[name], lo)
            maxs[name] = hi if name not in maxs else max(maxs[name], hi)
            nulls[name] = nulls.get(name, 0) + st.null_count
    stats = {"numRecords": meta.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls}
    return json.dumps(stats), meta.num_rows


class DeltaOutput:
    """The Delta tables under one output root, written by one run."""

    def __init__(self, spark, root: str, run_id: str, mode: str, method: str = "auto"):
        if method == "auto":
            method = "delta-spark" if connector_available(spark) else "deltalake"
        if method == "delta-spark" and not connector_available(spark):
            raise DeltaError("delta_writer is delta-spark but Delta's JVM connector is not on the "
                             "classpath; add it (--packages io.delta:delta-spark_2.12:<v>) or use deltalake")
        self.spark, self.root, self.run_id, self.mode, self.method = spark, root, run_id, mode, method
        self.attempt = f"{run_id}-{uuid.uuid4().hex[:8]}"
        self.app_id = APP_PREFIX + run_id
        self.committed_tables: set[str] = set()

    def table_uri(self, name: str) -> str:
        return join(self.root, name)

    def committed(self, name: str) -> bool:
        """Whether this run's commit still counts in table ``name``.

        The run's application transaction says a commit happened; it still counts unless
        a later commit overwrote the table. Where the log's history no longer reaches back
        to the run's commit, the run's rows in the current snapshot decide.
        """
        import pyarrow.compute as pc
        from deltalake import DeltaTable

        uri = self.table_uri(name)
        if not DeltaTable.is_deltatable(uri):
            return False
        table = DeltaTable(uri)
        if table.transaction_version(self.app_id) is None:
            return False
        for commit in table.history():  # newest first
            if _commit_metadata(commit).get("bfpack.run_id") == self.run_id:
                return True
            if (commit.get("operationParameters") or {}).get("mode") == "Overwrite":
                return False
        return table.to_pyarrow_dataset().count_rows(filter=pc.field("run_id") == self.run_id) > 0

    def _txn_version(self, uri: str) -> int:
        """A transaction version never used before for this run on this table: the table's next
        version. (Delta skips a write whose version it has seen; reruns are decided above.)"""
        from deltalake import DeltaTable

        return DeltaTable(uri).version() + 1 if DeltaTable.is_deltatable(uri) else 0

    def stage(self, name: str, df, sort_by: str | None = None) -> StagedTable:
        """Write ``df`` as Parquet files of this attempt under the table's directory."""
        directory = f"{self.attempt}"
        path = join(self.table_uri(name), directory)
        writer = df.sortWithinPartitions(sort_by) if sort_by else df
        writer.write.mode("errorifexists").parquet(path)
        return StagedTable(name, self.table_uri(name), directory, nullable_schema_json(df.schema.json()))

    def data_files(self, staged: StagedTable) -> list[str]:
        fs, base = filesystem(join(staged.uri, staged.directory))
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                      and not posixpath.basename(i.path).startswith((".", "_")))

    def _commit_metadata(self) -> dict[str, str]:
        return {"bfpack.run_id": self.run_id, "bfpack.attempt": self.attempt}

    def commit(self, staged: StagedTable) -> None:
        """One atomic commit that adds the staged files (and, in overwrite mode, removes the rest)."""
        if self.mode == "append" and self.committed(staged.name):
            log.info("table %s already holds run %s; not committing it again", staged.name, self.run_id)
            fs, path = filesystem(join(staged.uri, staged.directory))
            fs.delete_dir(path)
            return
        if self.method == "delta-spark":
            self._commit_delta_spark(staged)
        else:
            self._commit_deltalake(staged)
        self.committed_tables.add(staged.name)

    def _commit_deltalake(self, staged: StagedTable) -> None:
        from deltalake import CommitProperties, DeltaTable, Schema, Transaction
        from deltalake.transaction import AddAction, create_table_with_add_actions

        fs, table_path = filesystem(staged.uri)
        actions = []
        now = int(time.time() * 1000)
        for path in self.data_files(staged):
            info = fs.get_file_info(path)
            stats, _ = file_stats(fs, path)
            rel = posixpath.relpath(path.replace("\\", "/"), table_path.replace("\\", "/"))
            mtime = int(info.mtime.timestamp() * 1000) if info.mtime else now
            actions.append(AddAction(rel, info.size, {}, mtime, True, stats))
        schema = Schema.from_json(staged.schema_json)
        props = CommitProperties(app_transactions=[Transaction(self.app_id, self._txn_version(staged.uri))],
                                 custom_metadata=self._commit_metadata())
        if DeltaTable.is_deltatable(staged.uri):
            DeltaTable(staged.uri).create_write_transaction(actions, self.mode, schema,
                                                            commit_properties=props)
        else:
            create_table_with_add_actions(staged.uri, schema, actions, mode="append",
                                          commit_properties=props)

    def _commit_delta_spark(self, staged: StagedTable) -> None:
        df = self.spark.read.parquet(join(staged.uri, staged.directory))
        (df.write.format("delta").mode(self.mode)
         .option("txnAppId", self.app_id).option("txnVersion", self._txn_version(staged.uri))
         .option("userMetadata", json.dumps(self._commit_metadata()))
         .save(staged.uri))
        fs, path = filesystem(join(staged.uri, staged.directory))
        fs.delete_dir(path)

    def discard(self) -> None:
        """Remove the files this attempt staged and did not commit (readers never saw them)."""
        for name in {"sequences", "documents", "rejects", "stats"} - self.committed_tables:
            fs, path = filesystem(join(self.table_uri(name), self.attempt))
            if fs.get_file_info(path).type == pafs.FileType.Directory:
                fs.delete_dir(path)

    def clean_orphans(self, name: str, any_run: bool = False) -> list[str]:
        """Delete attempt directories under table ``name`` that no commit added.

        A directory is kept when the current snapshot reads a file in it or a commit in
        the log's history names it. This run's other attempts go at once; with
        ``any_run`` (while holding the output root's lock, so no run is staging) other
        runs' directories go too, once older than Delta's default retention (7 days).
        """
        from deltalake import DeltaTable

        uri = self.table_uri(name)
        fs, base = filesystem(uri)
        if fs.get_file_info(base).type != pafs.FileType.Directory:
            return []
        keep = {self.attempt}
        if DeltaTable.is_deltatable(uri):
            table = DeltaTable(uri)
            keep |= {p.split("/")[0] for p in pa.table(table.get_add_actions(flatten=True)).column("path").to_pylist()}
            keep |= {_commit_metadata(commit).get("bfpack.attempt") for commit in table.history()}
        cutoff = time.time() - RETENTION_SECONDS
        removed = []
        for info in fs.get_file_info(pafs.FileSelector(base)):
            dirname = posixpath.basename(info.path)
            if info.type != pafs.FileType.Directory or not _ATTEMPT.fullmatch(dirname) or dirname in keep:
                continue
            ours = dirname.startswith(self.run_id + "-")
            old = info.mtime is not None and info.mtime.timestamp() < cutoff
            if ours or (any_run and old):
                fs.delete_dir(info.path)
                removed.append(dirname)
        return removed


def read_table(spark, uri: str):
    """The current snapshot of a Delta table as a Spark DataFrame, with or without the connector."""
    if connector_available(spark):
        return spark.read.format("delta").load(uri)
    from deltalake import DeltaTable
    from pyspark.sql.types import StructType

    if not DeltaTable.is_deltatable(uri):
        raise DeltaError(f"{uri} is not a Delta table")
    table = DeltaTable(uri)
    schema = StructType.fromJson(json.loads(table.schema().to_json()))
    files = table.file_uris()
    if not files:
        return spark.createDataFrame([], schema)
    return spark.read.schema(schema).parquet(*files)
