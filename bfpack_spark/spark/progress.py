"""What a run says while a stage runs: a progress bar on a terminal, progress lines in a log.

Spark's own console bar is off (it interleaves with log lines). On a terminal, this one polls
Spark's status tracker from a thread, draws on stderr and clears its line when the stage ends. Where
stderr is not a terminal (spark-submit on a cluster, a scheduler, ``> log``), the same thread logs one
line every ``interval`` seconds instead: tasks done of all, the stage's documents and tokens so far
and MB/s (from counters its tasks add to as they finish: :class:`Counters`), and an ETA. On a
cluster these are the driver's log lines.
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


def _eta(elapsed: float, done: float, total: float) -> str:
    if not done or total <= done:
        return "ETA --:--"
    left = int(elapsed * (total - done) / done)
    return f"ETA {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}" if left >= 3600 else \
        f"ETA {left // 60}:{left % 60:02d}"


def _line(label: str, done: int, total: int, elapsed: float) -> str:
    filled = BAR * done // total if total else 0
    return f"\r{label:<20} [{'#' * filled}{'.' * (BAR - filled)}] {done}/{total} tasks  {_eta(elapsed, done, total)} "


def _tasks(tracker) -> tuple[int, int]:
    """Completed and total tasks of the active stages."""
    done = total = 0
    for stage_id in tracker.getActiveStageIds():
        info = tracker.getStageInfo(stage_id)
        if info is not None:
            done, total = done + info.numCompletedTasks, total + info.numTasks
    return done, total


class Counters:
    """What a stage's tasks have done so far, as Spark accumulators (added to when a task finishes, read
    on the driver): documents, tokens and input bytes; ``total_bytes``: the stage's input, for the ETA."""

    def __init__(self, spark, total_bytes: int = 0):
        sc = spark.sparkContext
        self.documents, self.tokens, self.bytes = sc.accumulator(0), sc.accumulator(0), sc.accumulator(0)
        self.total_bytes = total_bytes

    def add(self, documents: int, tokens: int, nbytes: int) -> None:
        """In a task: what it finished."""
        self.documents.add(documents)
        self.tokens.add(tokens)
        self.bytes.add(nbytes)


def progress_line(label: str, done: int, total: int, elapsed: float, counters: Counters | None = None) -> str:
    """``stage read: 12/48 tasks, 1,234,567 documents, 456,789,012 tokens, 38.2 MB/s, ETA 4:12``."""
    parts = [f"stage {label}: {done}/{total} tasks"]
    eta = _eta(elapsed, done, total)
    if counters is not None:
        nbytes = counters.bytes.value
        parts += [f"{counters.documents.value:,} documents", f"{counters.tokens.value:,} tokens",
                  f"{nbytes / 2**20 / max(elapsed, 1e-9):.2f} MB/s"]
        if counters.total_bytes and nbytes:
            eta = _eta(elapsed, nbytes, counters.total_bytes)
    return ", ".join(parts + [eta])


@contextmanager
def stage_progress(spark, label: str, stream=None, interval: float = 0.5, *, log_every: float = 30.0,
                   counters: Counters | None = None):
    """While the block runs: ``label``'s progress bar on a terminal (redrawn every ``interval`` s), else a
    progress line logged every ``log_every`` s (none when 0)."""
    stream = stream or sys.stderr
    terminal = stream.isatty()
    if spark is None or not (terminal or log_every > 0):
        yield
        return
    tracker, stop, start = spark.sparkContext.statusTracker(), threading.Event(), time.monotonic()

    def draw() -> None:
        while not stop.wait(interval if terminal else log_every):
            done, total = _tasks(tracker)
            if not total:
                continue
            if terminal:
                stream.write(_line(label, done, total, time.monotonic() - start))
                stream.flush()
            else:
                log.info("%s", progress_line(label, done, total, time.monotonic() - start, counters))

    thread = threading.Thread(target=draw, name="bfpack-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if terminal:
            stream.write("\r" + " " * (BAR + 60) + "\r")
            stream.flush()


@dataclass
class StageTimer:
    """Seconds per stage of a run; while a stage runs, a progress bar over its Spark tasks (on a terminal).
    An error names the innermost stage it came from (``bfpack_stage``: the command line says it)."""

    seconds: dict[str, float] = field(default_factory=dict)
    spark: Any = None
    log_every: float = 30.0  # seconds between progress lines where stderr is not a terminal (0: none)

    @contextmanager
    def __call__(self, stage: str, announce: bool = True, counters: Counters | None = None):
        if announce:
            log.info("stage %s ...", stage)
        t0 = time.perf_counter()
        try:
            with stage_progress(self.spark, stage, log_every=self.log_every, counters=counters):
                yield
        except Exception as exc:
            if not hasattr(exc, "bfpack_stage"):  # the innermost stage: what the error message names
                exc.bfpack_stage = stage  # type: ignore[attr-defined]
            raise
        self.seconds[stage] = round(time.perf_counter() - t0, 3)
        log.info("stage %s done in %.1fs", stage, self.seconds[stage])

