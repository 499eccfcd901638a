"""The output root, as one run holds it: its lock, whether the run is already committed there, and the
clean-up after it, whatever way the run ends.

While the run holds the root (``with OutputRoot(...) as root``): no other run writes there (the lock);
the tables have this version's schema; an earlier run replaced by a committed one (an incremental run's
``--repack-changed``) has its rows removed, before and after this run's commits. When the run fails,
the files it staged and did not commit go; when it succeeds, every table's orphans (files of attempts no
commit added) and the workspaces killed attempts left go too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from bfpack_spark.config import PackConfig
from bfpack_spark.incremental import unfinished_replacements
from bfpack_spark.io.store.lock import OutputLock
from bfpack_spark.io.store.workspace import clean_workspaces, remove_if_empty, workspace_root
from bfpack_spark.io.tables.delta import RETENTION_SECONDS, DeltaOutput, read_stats_row
from bfpack_spark.schemas import TABLES

log = logging.getLogger("bfpack")


class OutputRoot:
    """``config.output.output`` held by run ``run_id`` (see the module)."""

    def __init__(self, spark, config: PackConfig, run_id: str):
        self.spark, self.config, self.run_id = spark, config, run_id
        self.root = config.output.output
        self.appending = config.output.mode in ("append", "incremental")
        self._lock = OutputLock(self.root, run_id)
        self.output: DeltaOutput

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

    def committed_stats(self) -> dict | None:
        """This run's ``stats`` row, where an earlier attempt of it committed every table (appending: the
        ``stats`` commit is the last); None where it did not."""
        if self.appending and self.output.committed("stats"):
            return read_stats_row(self.output.table_uri("stats"), self.run_id)
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc_type is not None:
                self.output.discard()
                if self.config.output.work_dir is None:
                    remove_if_empty(workspace_root(self.root, None))
                return
            if self.appending:
                self._remove_replaced()
            self._clean()
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
        work = workspace_root(self.root, self.config.output.work_dir)
        clean_workspaces(work, self.output.attempt, self.run_id, self._lock.held,
                         time.time() - (RETENTION_SECONDS if shared else 0))
        if not shared:
            remove_if_empty(work)



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
