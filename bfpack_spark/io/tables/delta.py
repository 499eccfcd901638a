"""Delta output: the tasks write Parquet data files (:mod:`bfpack_spark.io.tables.staging`), then one
atomic commit per table adds exactly the files whose descriptions reached the driver.

Two ways to commit, same tables (schema, rows, one commit per table per run):

- ``deltalake`` (delta-rs, a PyPI package; needs no JVM connector): one commit of
  ``AddAction`` s, with the per-file statistics the writers computed;
- ``delta-spark`` (where Delta's JVM connector is on the classpath: EMR, Databricks):
  Spark reads the staged files and writes them through ``format("delta")``; so it is
  chosen only when the JVM can open the output root's file system.

Every commit carries the application transaction ``(bfpack:<run_id>, 0)``, so a
table already holding a run is recognized and never gets its rows twice. Files
written by an attempt that did not commit are never in the log, so readers never
see them; :meth:`DeltaOutput.clean_orphans` removes them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import re
import time
import uuid
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.fs as pafs

from bfpack_spark import faults
from bfpack_spark.io.store import retry
from bfpack_spark.io.store.fs import delta_storage_options, filesystem, join, make_dirs
from bfpack_spark.io.tables.read import DeltaError, connector_available, delta_table, snapshot_dataset, table_dataset
from bfpack_spark.io.tables.staging import StagedFile
from bfpack_spark.schemas import STATS, TABLES, delta_schema_json, stats_table

log = logging.getLogger(__name__)

APP_PREFIX = "bfpack:"
RETENTION_SECONDS = 7 * 24 * 3600
#: a replaced run's rows leave the tables in this order: its stats row, last, says it is done
REMOVAL_ORDER = ("rejects", "documents", "sequences", "inputs", "stats")
#: a folder of staged files under a table: a run's (its id), or an attempt's (bfpack before 0.2); not _delta_log
_STAGED = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def jvm_can_open(spark, uri: str) -> bool:
    """Whether Spark's JVM has a file system for ``uri`` (pip's pyspark has none for s3://)."""
    try:
        jpath = spark._jvm.org.apache.hadoop.fs.Path(uri)
        jpath.getFileSystem(spark._jsc.hadoopConfiguration())
        return True
    except Exception:
        return False


def _commit_metadata(commit: dict) -> dict:
    """bfpack's keys of a commit: top-level custom metadata (delta-rs) or userMetadata JSON (delta-spark)."""
    meta = commit.get("userMetadata")
    meta = json.loads(meta) if isinstance(meta, str) and meta.startswith("{") else {}
    meta.update({k: v for k, v in commit.items() if k.startswith("bfpack.")})
    return meta


class DeltaOutput:
    """The Delta tables under one output root, written by one run."""

    def __init__(self, spark, root: str, run_id: str, mode: str, method: str = "auto"):
        if method == "auto":
            method = ("delta-spark" if connector_available(spark) and jvm_can_open(spark, root)
                      else "deltalake")
        if method == "delta-spark" and not connector_available(spark):
            raise DeltaError("delta_writer is delta-spark but Delta's JVM connector is not on the "
                             "classpath; add it (--packages io.delta:delta-spark_2.13:<v> for Spark 4, "
                             "delta-spark_2.12 for Spark 3.5) or use deltalake")
        if method == "delta-spark" and not jvm_can_open(spark, root):
            raise DeltaError(f"delta_writer is delta-spark but Spark's JVM has no file system for {root}; "
                             f"use delta_writer: deltalake")
        self.spark, self.root, self.run_id, self.mode, self.method = spark, root, run_id, mode, method
        suffix = uuid.uuid4().hex[:8]
        self.attempt = f"{run_id}-{suffix}"  # this attempt's commits say it
        # where this attempt's tasks stage files in every table: a folder of the run's folder, beside the
        # folders of its earlier attempts (whose files a resumed attempt commits too)
        self.folder = f"{run_id}/{suffix}"
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
        return retry.call(lambda: self._committed(name), f"read the log of {self.table_uri(name)}")

    def _committed(self, name: str) -> bool:
        import pyarrow.compute as pc

        table = delta_table(self.table_uri(name))
        if table is None:
            return False
        if table.transaction_version(self.app_id) is None:
            return False
        for commit in table.history():  # newest first
            if _commit_metadata(commit).get("bfpack.run_id") == self.run_id:
                return True
            if (commit.get("operationParameters") or {}).get("mode") == "Overwrite":
                return False
        return table_dataset(table).count_rows(filter=pc.field("run_id") == self.run_id) > 0

    def check_schemas(self) -> None:
        """Before anything is read: every existing table must have this version's schema.

        A ``stats`` table of an older version (JSON strings for ``truncations_by_length`` and
        ``audit``) is migrated in one overwrite commit of its few rows; any other difference
        stops the run, saying what to do.
        """

        for name, schema in TABLES.items():
            uri = self.table_uri(name)
            table = delta_table(uri)
            if table is None:
                continue
            have = json.loads(table.schema().to_json())
            if _shape(have) == _shape(json.loads(delta_schema_json(schema))):
                continue
            if self.mode == "overwrite":
                continue  # the overwrite commit replaces the schema
            missing = _added_columns(have, schema)
            if missing:
                table.alter.add_columns(missing)
                log.info("%s: added the column(s) %s of this version", uri, ", ".join(f.name for f in missing))
                continue
            if name == "stats" and _is_stats_v1(have):
                migrate_stats_v1(uri)
                log.info("%s: migrated to the current stats schema (typed truncations_by_length, audit maps)", uri)
                continue
            theirs = {f["name"] for f in have["fields"]} ^ {f.name for f in schema}
            raise DeltaError(f"{uri} was written with another table schema (columns differing: "
                             f"{', '.join(sorted(theirs)) or 'types'}); write to a new output root, "
                             f"or rebuild it with --mode overwrite")

    def _txn_version(self, uri: str) -> int:
        """A transaction version never used before for this run on this table: the table's next
        version. (Delta skips a write whose version it has seen; reruns are decided above.)"""

        table = delta_table(uri)
        return table.version() + 1 if table is not None else 0

    def _our_metadata(self, files: Sequence[StagedFile] = ()) -> dict[str, str]:
        """What a commit of this attempt says of itself: the run, the attempt, and the folders of the files
        it adds (an earlier attempt's too, for a resumed run), which clean-up keeps."""
        folders = sorted({posixpath.dirname(f.path) for f in files})
        return {"bfpack.run_id": self.run_id, "bfpack.attempt": self.attempt, "bfpack.folders": json.dumps(folders)}

    def holds_run(self, name: str) -> bool:
        """Whether table ``name`` holds this run's rows as this mode leaves them (an earlier attempt of the
        run committed it): appending, a commit of the run that still counts; overwriting, the run's commit
        is the table's latest."""
        if self.mode == "append":
            return self.committed(name)
        return any(m.get("bfpack.run_id") == self.run_id for m in self._recent_commits(name, 1))

    def _recent_commits(self, name: str, n: int) -> list[dict]:
        """bfpack's keys of the latest ``n`` commits of table ``name`` (newest first; none without a table)."""
        def recent() -> list[dict]:
            table = delta_table(self.table_uri(name))
            return [] if table is None else [_commit_metadata(c) for c in table.history(n)]

        return retry.call(recent, f"read the log of {self.table_uri(name)}")

    def commit(self, name: str, files: list[StagedFile]) -> None:
        """One atomic commit that adds ``files`` to table ``name`` (and, in overwrite mode, removes
        the rest); then the run's other files there (of failed task attempts) are deleted."""
        if self.holds_run(name):
            log.info("table %s already holds run %s; not committing it again", name, self.run_id)
            self._delete_attempt(name)
            return
        files = self._not_in_snapshot(name, files)
        if self.method == "delta-spark":
            self._commit_delta_spark(name, files)
        else:
            retry.call(lambda: self._commit_deltalake(name, files), f"commit {self.table_uri(name)}")
            self._delete_attempt(name, keep={f.path for f in files})
        self.committed_tables.add(name)

    def _not_in_snapshot(self, name: str, files: list[StagedFile]) -> list[StagedFile]:
        """``files``, those the table's snapshot already reads copied to this attempt's folder: an earlier
        attempt of the run committed them before another commit came (a commit must not remove and add one
        path)."""
        table = delta_table(self.table_uri(name))
        read = set() if table is None else set(pa.table(table.get_add_actions(flatten=True)).column("path").to_pylist())
        if not read & {f.path for f in files}:
            return files
        fs, base = filesystem(self.table_uri(name))
        make_dirs(fs, posixpath.join(base, self.folder))
        out = []
        for f in files:
            if f.path in read:
                copy = f"{self.folder}/{posixpath.basename(f.path)}"
                fs.copy_file(posixpath.join(base, f.path), posixpath.join(base, copy))
                f = dataclasses.replace(f, path=copy)
            out.append(f)
        return out

    def _landed(self, name: str) -> bool:
        """Whether this attempt's commit is in table ``name``'s log: a commit whose reply was lost
        (delta-rs then meets its own commit file, written with ``If-None-Match``, as a conflict)."""
        return any(m.get("bfpack.attempt") == self.attempt for m in self._recent_commits(name, 10))

    def _commit_deltalake(self, name: str, files: list[StagedFile]) -> None:
        from deltalake import CommitProperties, Schema, Transaction
        from deltalake.transaction import AddAction, create_table_with_add_actions

        uri = self.table_uri(name)
        now = int(time.time() * 1000)
        actions = [AddAction(f.path, f.size, {}, now, True, f.stats) for f in files]
        schema = Schema.from_json(delta_schema_json(TABLES[name]))
        props = CommitProperties(app_transactions=[Transaction(self.app_id, self._txn_version(uri))],
                                 custom_metadata=self._our_metadata(files))
        table = delta_table(uri)
        try:
            if table is not None:
                table.create_write_transaction(actions, self.mode, schema, commit_properties=props)
            else:
                create_table_with_add_actions(uri, schema, actions, mode="append", commit_properties=props,
                                              storage_options=delta_storage_options())
        except Exception:
            if not self._landed(name):
                raise
            log.info("%s: the commit landed though its reply was lost", uri)

    def _commit_delta_spark(self, name: str, files: list[StagedFile]) -> None:
        from pyspark.sql.types import StructType

        uri = self.table_uri(name)
        schema = StructType.fromJson(json.loads(delta_schema_json(TABLES[name])))
        df = (self.spark.read.schema(schema).parquet(*[join(uri, f.path) for f in files]) if files
              else self.spark.createDataFrame([], schema))
        (df.write.format("delta").mode(self.mode)
         .option("txnAppId", self.app_id).option("txnVersion", self._txn_version(uri))
         .option("userMetadata", json.dumps(self._our_metadata(files)))
         .save(uri))
        self._delete_attempt(name)

    def remove_run(self, old_run: str, replaced_by: str) -> None:
        """Remove the rows of ``old_run``, which run ``replaced_by`` replaces, from every table: one delete
        commit per table, ``stats`` last, so a ``stats`` row left says the removal is unfinished.
        Each of a run's data files holds only its rows, so whole files leave the snapshot."""
        predicate = "run_id = '{}'".format(old_run.replace("'", "''"))
        for name in REMOVAL_ORDER:
            faults.check(f"remove:{name}")
            uri = self.table_uri(name)
            if self.method == "delta-spark":
                from delta.tables import DeltaTable as SparkDeltaTable

                SparkDeltaTable.forPath(self.spark, uri).delete(predicate)
                continue
            from deltalake import CommitProperties

            table = delta_table(uri)
            if table is not None:
                table.delete(predicate, commit_properties=CommitProperties(
                    custom_metadata={"bfpack.removed_run": old_run, "bfpack.replaced_by": replaced_by}))
        log.info("removed the rows of run %s, replaced by run %s", old_run, replaced_by)

    def _delete_attempt(self, name: str, keep: frozenset[str] | set[str] = frozenset()) -> None:
        """Delete this attempt's staged files under table ``name`` but those in ``keep`` (relative paths)."""
        fs, base = filesystem(join(self.table_uri(name), self.folder))
        if fs.get_file_info(base).type != pafs.FileType.Directory:
            return
        if not keep:
            fs.delete_dir(base)
            run_folder = posixpath.dirname(base)  # the run's folder goes with its last attempt
            if not fs.get_file_info(pafs.FileSelector(run_folder, allow_not_found=True)):
                fs.delete_dir(run_folder)
            return
        _delete_files_but(fs, base, self.folder, keep)

    def discard(self) -> None:
        """Remove the files this attempt staged and did not commit (readers never saw them)."""
        for name in set(TABLES) - self.committed_tables:
            self._delete_attempt(name)

    def clean_orphans(self, name: str, any_run: bool = False) -> list[str]:
        """Delete the folders of staged files under table ``name`` that no commit added.

        A run's folder is kept when the current snapshot reads a file in it or a commit in the log's
        history names the run; inside this run's folder, an attempt's folder is kept when the snapshot
        reads a file in it or a commit names it (a resumed attempt's commits name the earlier attempts'
        folders they took files from), else it goes, and so does every file of a kept one that the
        snapshot does not read (what a stopped attempt wrote and its resumption wrote again). It runs
        once this run has committed every table. Folders of this run's attempts of bfpack before
        0.2 go at once; with ``any_run`` (while holding the output root's lock, so no run is staging)
        other runs' folders go too, once older than Delta's default retention (7 days).
        """
        uri = self.table_uri(name)
        fs, base = filesystem(uri)
        if fs.get_file_info(base).type != pafs.FileType.Directory:
            return []
        adds, keep = retry.call(lambda: _committed_folders(uri), f"read the log of {uri}")
        keep.add(self.folder)
        cutoff = time.time() - RETENTION_SECONDS
        removed = []
        for info in fs.get_file_info(pafs.FileSelector(base)):
            dirname = posixpath.basename(info.path)
            if info.type != pafs.FileType.Directory or not _STAGED.fullmatch(dirname):
                continue
            if dirname == self.run_id:
                removed += self._clean_attempts(fs, info.path, keep, adds)
                continue
            if dirname in keep:
                continue
            legacy = re.fullmatch(re.escape(self.run_id) + r"-[0-9a-f]{8}", dirname)  # an attempt of before 0.2
            old = info.mtime is not None and info.mtime.timestamp() < cutoff
            if legacy or (any_run and old):
                fs.delete_dir(info.path)
                removed.append(dirname)
        return removed

    def _clean_attempts(self, fs: pafs.FileSystem, path: str, keep: set[str], adds: set[str]) -> list[str]:
        """The folders of this run's attempts that no commit added, and the files of the others that the
        snapshot does not read."""
        removed = []
        for info in fs.get_file_info(pafs.FileSelector(path)):
            folder = f"{self.run_id}/{posixpath.basename(info.path)}"
            if info.type != pafs.FileType.Directory:
                continue
            if folder not in keep:
                fs.delete_dir(info.path)
                removed.append(folder)
                continue
            removed += _delete_files_but(fs, info.path, folder, adds)
        return removed


def _delete_files_but(fs: pafs.FileSystem, path: str, folder: str, keep: frozenset[str] | set[str]) -> list[str]:
    """Delete the files under ``path`` (the table's ``folder``) whose paths in the table are not in ``keep``;
    their paths in the table."""
    removed = []
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        rel = f"{folder}/{info.path[len(path):].lstrip('/')}"
        if info.type == pafs.FileType.File and rel not in keep:
            fs.delete_file(info.path)
            removed.append(rel)
    return removed


def _committed_folders(uri: str) -> tuple[set[str], set[str]]:
    """The files the snapshot of the table at ``uri`` reads (relative paths), and the folders it reads
    files in (a run's, and its attempt's inside it) with those its log's commits name (their runs,
    attempts and folders)."""
    table = delta_table(uri)
    if table is None:
        return set(), set()
    adds = set(pa.table(table.get_add_actions(flatten=True)).column("path").to_pylist())
    folders = {p.split("/")[0] for p in adds} | {posixpath.dirname(p) for p in adds}
    for commit in table.history():
        meta = _commit_metadata(commit)
        folders |= {meta[k] for k in ("bfpack.attempt", "bfpack.run_id") if meta.get(k)}
        folders |= set(json.loads(meta.get("bfpack.folders") or "[]"))
    return adds, folders


def _shape(schema):
    """A Delta schema's names and types, without nullability and metadata (writers differ there)."""
    if isinstance(schema, dict):
        return {k: _shape(v) for k, v in schema.items()
                if k not in ("nullable", "containsNull", "valueContainsNull", "metadata")}
    if isinstance(schema, list):
        return [_shape(v) for v in schema]
    return schema


def _added_columns(have: dict, schema: pa.Schema) -> list:
    """The columns this version adds to a table otherwise identical (Delta fields to add), or []."""
    from deltalake import Schema

    ours = json.loads(delta_schema_json(schema))["fields"]
    theirs = {f["name"]: _shape(f) for f in have["fields"]}
    if not theirs or any(theirs.get(f["name"], _shape(f)) != _shape(f) for f in ours) \
            or not set(theirs) < {f["name"] for f in ours}:
        return []
    extra = [f for f in ours if f["name"] not in theirs]
    return list(Schema.from_json(json.dumps({"type": "struct", "fields": extra})).fields)


def _is_stats_v1(schema: dict) -> bool:
    types = {f["name"]: f["type"] for f in schema["fields"]}
    return types.get("truncations_by_length") == "string" and types.get("audit") == "string"


def migrate_stats_v1(uri: str) -> None:
    """Rewrite an old ``stats`` table in the current schema, in one atomic overwrite commit:
    JSON strings become typed columns; columns the old version did not have are null."""
    from deltalake import write_deltalake

    dataset = snapshot_dataset(uri)
    if dataset is None:
        return
    old = dataset.to_table().to_pylist()
    rows = []
    for row in old:
        audit = json.loads(row.pop("audit") or "{}")
        new = {f.name: row.get(f.name) for f in STATS}
        new["truncations_by_length"] = json.loads(row["truncations_by_length"] or "[]")
        new["audit_checks"] = audit.get("checks", {})
        new["audit_found"] = {k: int(v) for k, v in audit.get("found", {}).items()}
        new["audit_expected"] = {k: int(v) for k, v in audit.get("expected", {}).items()}
        new["stage_seconds"] = dict(row.get("stage_seconds") or [])
        rows.append(new)
    table = pa.concat_tables([stats_table(r) for r in rows]) if rows else STATS.empty_table()
    write_deltalake(uri, table, mode="overwrite", schema_mode="overwrite", storage_options=delta_storage_options())
