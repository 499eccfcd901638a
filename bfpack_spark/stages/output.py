"""The output root, as one run holds it: its lock, whether the run is already committed there, its
workspace (what an earlier attempt of it finished), and the clean-up after it, whatever way it ends.

While the run holds the root (``with OutputRoot(...) as root``): no other run writes there (the lock);
the tables have this version's schema; an earlier run replaced by a committed one (an incremental run's
``--repack-changed``) has its rows removed, before and after this run's commits.

A run keeps its work where every attempt of it finds it: its tasks' records in its workspace
(``<work>/<run id>``), its staged files in each table's folder of the run. An attempt that stopped
without a verdict (its driver killed, out of memory, a store or cluster failure) leaves them, and the
same command resumes from them (``--no-resume``: afresh). A run that fails its own checks (the audit,
the reject limit) removes what it staged and wrote: nothing of it is worth resuming. A run that
succeeds removes its workspace, every table's orphans (folders no commit added) and the workspaces
other runs left.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import pyarrow.fs as pafs

from bfpack_spark.audit import AuditError
from bfpack_spark.config import PackConfig
from bfpack_spark.errors import InputError
from bfpack_spark.incremental import unfinished_replacements
from bfpack_spark.io.store.fs import filesystem, join
from bfpack_spark.io.store.lock import OutputLock
from bfpack_spark.io.store.workspace import (
    Workspace,
    clean_workspaces,
    remove_if_empty,
    workspace_name,
    workspace_root,
)
from bfpack_spark.io.tables.delta import RETENTION_SECONDS, DeltaOutput
from bfpack_spark.io.tables.read import read_stats_row, stats_rows
from bfpack_spark.schemas import TABLES

log = logging.getLogger("bfpack")

#: what a run is, in its workspace (to say why another run does not resume it)
RUN_FILE = "run.json"


def check_root(config: PackConfig, run_id: str) -> None:
    """Refuse, before anything is read, an output root that holds what bfpack did not write (in every mode:
    a wrong ``--output`` must not pack into someone's folder), and, without an explicit ``--mode``, one that
    holds the tables of another run (replacing them takes ``--mode overwrite``)."""
    root = config.output.output
    found = foreign_entries(root)
    if found:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise InputError(f"the output root {root} holds what bfpack did not write ({shown}); give --output a "
                         f"directory of its own: new, empty, or one bfpack wrote")
    if config.output.mode is not None:
        return
    runs = stats_rows(root, ["run_id", "started_at", "seq_len", "config"])
    if runs and run_id not in {r["run_id"] for r in runs}:
        last = max(runs, key=lambda r: r["started_at"] or "")
        tokenizer = json.loads(last["config"] or "{}").get("tokenizer", {}).get("tokenizer", "?")
        others = f" (and {len(runs) - 1} more runs)" if len(runs) > 1 else ""
        when = (last["started_at"] or "?")[:16].replace("T", " ")
        raise InputError(f"the output root {root} holds run {last['run_id']}{others}, packed {when} "
                         f"at seq_len {last['seq_len']} with {tokenizer} from other input files or settings; "
                         f"give --mode overwrite to replace it, --mode append to add this run beside it, or "
                         f"another --output")


def foreign_entries(root: str) -> list[str]:
    """What the output root holds that bfpack did not write: anything beside its tables, the lock and the
    workspaces, and in a table's folder anything but its log, run folders and Parquet files (hidden
    files, such as an editor's or a file browser's, are let be)."""
    fs, base = filesystem(root)
    found = []
    for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
        name = posixpath.basename(info.path)
        folder = info.type == pafs.FileType.Directory
        if name.startswith(".") or name.startswith("_bfpack"):
            continue
        if name not in TABLES or not folder:
            found.append(name + "/" * folder)
            continue
        for inner in fs.get_file_info(pafs.FileSelector(info.path)):
            entry = posixpath.basename(inner.path)
            if not (entry.startswith((".", "_")) or inner.type == pafs.FileType.Directory
                    or entry.endswith(".parquet")):
                found.append(f"{name}/{entry}")
    return sorted(found)


class OutputRoot:
    """``config.output.output`` held by run ``run_id`` (see the module)."""

    def __init__(self, spark, config: PackConfig, run_id: str):
        self.spark, self.config, self.run_id = spark, config, run_id
        self.root = config.output.output
        self.appending = config.output.mode in ("append", "incremental")
        self._lock = OutputLock(self.root, run_id)
        self.output: DeltaOutput
        self.work = workspace_root(self.root, config.output.work_dir)
        self.workspace = Workspace(join(self.work, workspace_name(self.root, run_id)))

    def __enter__(self) -> OutputRoot:
        self._lock.__enter__()
        try:
            self.output = DeltaOutput(self.spark, self.root, self.run_id, "append" if self.appending else "overwrite",
                                      self.config.output.delta_writer)
            self.output.check_schemas()
            if self.appending:
                self._remove_replaced()
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def prepare_workspace(self, identity: dict) -> None:
        """Resume from what an earlier attempt of the run finished (or, with ``--no-resume``, drop it), say so
        in one line, and say why other runs' unfinished work here is not resumed; then record what the run
        is (``identity``: its settings' fingerprint, its input files' count, and ``key``: the id its files
        and settings give it, which an explicit run id may hide)."""
        done = self.workspace.records()
        before = self.workspace.read_json(RUN_FILE) or {}
        if done and before.get("key") != identity["key"]:
            log.info("run %s: starting afresh, not from the %s tasks an earlier attempt finished: %s", self.run_id,
                     sum(done.values()), _why(before, identity))
            self.workspace.remove()
        elif done and not self.config.output.resume:
            log.info("run %s: starting afresh (--no-resume), not from the %s tasks an earlier attempt finished",
                     self.run_id, sum(done.values()))
            self.workspace.remove()
        elif done:
            log.info("run %s: resuming, %s", self.run_id,
                     ", ".join(f"{n} {stage} tasks done" for stage, n in sorted(done.items())))
        for other, theirs in _unfinished(self.work, self.workspace.uri):
            log.info("run %s did not finish here and is not resumed: %s; this run (%s) starts afresh",
                     theirs.get("run_id", other), _why(theirs, identity), self.run_id)
        self.workspace.write_json(RUN_FILE, identity)

    def committed_stats(self) -> dict | None:
        """This run's ``stats`` row, where an earlier attempt of it committed every table (appending: the
        ``stats`` commit is the last); None where it did not."""
        if (self.appending or self.config.output.mode is None) and self.output.committed("stats"):
            return read_stats_row(self.output.table_uri("stats"), self.run_id)
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc_type is None:
                if self.appending:
                    self._remove_replaced()
                self.workspace.remove()
                self._clean()
            elif isinstance(exc, AuditError) or not self.config.output.resume:
                self.output.discard()
                self.workspace.remove()
                if self.config.output.work_dir is None:
                    remove_if_empty(self.work)
            else:
                log.info("run %s stopped; what its tasks finished is kept: the same command resumes from it",
                         self.run_id)
        finally:
            self._lock.__exit__(exc_type, exc, tb)

    def _remove_replaced(self) -> None:
        _remove_replaced(self.output)

    def _clean(self) -> None:
        """Orphans of every table; the workspaces of killed attempts (under the output root, the lock says
        no run is reading one; in a shared ``work_dir``, a week after their last write)."""
        for name in TABLES:
            self.output.clean_orphans(name, any_run=self._lock.held)
        shared = self.config.output.work_dir is not None
        clean_workspaces(self.work, keep=posixpath.basename(self.workspace.uri.rstrip("/")), run_id=self.run_id,
                         any_run=self._lock.held, older_than=time.time() - (RETENTION_SECONDS if shared else 0))
        if not shared:
            remove_if_empty(self.work)



def _why(theirs: dict, ours: dict) -> str:
    """Why an earlier run's work does not serve this one, in words."""
    if theirs.get("fingerprint") != ours["fingerprint"]:
        return "its settings differ"
    return f"its input files differ ({theirs.get('files')} files then, {ours['files']} now, or their versions)"


def _unfinished(work: str, mine: str) -> list[tuple[str, dict]]:
    """Other workspaces under ``work`` (not ``mine``) that hold finished tasks: (name, what that run was)."""
    fs, base = filesystem(work)
    found = []
    for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
        name = posixpath.basename(info.path)
        theirs = Workspace(join(work, name))
        if info.type == pafs.FileType.Directory and theirs.uri.rstrip("/") != mine.rstrip("/") and theirs.records():
            found.append((name, theirs.read_json(RUN_FILE) or {}))
    return found


def finish_replacements(config: PackConfig, spark: Callable[[], Any]) -> None:
    """Nothing new to pack, but a run stopped before removing the rows it replaced: remove them (under the
    output root's lock; ``spark`` makes the session, only then)."""
    root = config.output.output
    if unfinished_replacements(root):
        with OutputLock(root, "replacements"):
            _remove_replaced(DeltaOutput(spark(), root, "replacements", "append", config.output.delta_writer))


def _remove_replaced(output: DeltaOutput) -> None:
    """Remove the rows of every run that a committed run replaced."""
    for old, new in sorted(unfinished_replacements(output.root).items()):
        output.remove_run(old, new)
