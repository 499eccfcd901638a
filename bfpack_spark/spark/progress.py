"""A one-line progress bar with ETA over the Spark tasks of the stage the job is in.

Spark's own console bar is off (it interleaves with log lines); this one polls Spark's
status tracker from a thread, draws on stderr only when stderr is a terminal, and clears its
line when the stage ends, so logs and the summary stay readable in a terminal and in a file.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

BAR = 30
log = logging.getLogger("bfpack")


def _line(label: str, done: int, total: int, elapsed: float) -> str:
    filled = BAR * done // total if total else 0
    left = int(elapsed * (total - done) / done) if done else None
    eta = "ETA --:--" if left is None else f"ETA {left // 60}:{left % 60:02d}"
    return f"\r{label:<20} [{'#' * filled}{'.' * (BAR - filled)}] {done}/{total} tasks  {eta} "


def _tasks(tracker) -> tuple[int, int]:
    """Completed and total tasks of the active stages."""
    done = total = 0
    for stage_id in tracker.getActiveStageIds():
        info = tracker.getStageInfo(stage_id)
        if info is not None:
            done, total = done + info.numCompletedTasks, total + info.numTasks
    return done, total


@contextmanager
def stage_progress(spark, label: str, stream=None, interval: float = 0.5):
    """Draw ``label``'s progress while the block runs (nothing when ``stream`` is not a terminal)."""
    stream = stream or sys.stderr
    if spark is None or not stream.isatty():
        yield
        return
    tracker, stop, start = spark.sparkContext.statusTracker(), threading.Event(), time.monotonic()

    def draw() -> None:
        while not stop.wait(interval):
            done, total = _tasks(tracker)
            if total:
                stream.write(_line(label, done, total, time.monotonic() - start))
                stream.flush()

    thread = threading.Thread(target=draw, name="bfpack-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        stream.write("\r" + " " * (BAR + 60) + "\r")
        stream.flush()


@dataclass
class StageTimer:
    """Seconds per stage of a run; while a stage runs, a progress bar over its Spark tasks (on a terminal).
    An error names the innermost stage it came from (``bfpack_stage``: the command line says it)."""

    seconds: dict[str, float] = field(default_factory=dict)
    spark: Any = None

    @contextmanager
    def __call__(self, stage: str, announce: bool = True):
        if announce:
            log.info("stage %s ...", stage)
        t0 = time.perf_counter()
        try:
            with stage_progress(self.spark, stage):
                yield
        except Exception as exc:
            if not hasattr(exc, "bfpack_stage"):  # the innermost stage: what the error message names
                exc.bfpack_stage = stage  # type: ignore[attr-defined]
            raise
        self.seconds[stage] = round(time.perf_counter() - t0, 3)
        log.info("stage %s done in %.1fs", stage, self.seconds[stage])

