"""Failure injection at named points, so tests can crash a run anywhere and rerun it.

Off unless the environment variable ``BFPACK_FAULTS_FILE`` names a JSON file that
maps point names to ``"once"`` (fail the first time the point is reached, on any
process), ``"always"``, ``"kill-executor"`` (the first time, in a task: kill the executor
JVM that runs it, as a lost node would be), ``"hang"`` (wait there until killed: a test kills
the driver at that point), or ``"slow:<seconds>"`` (wait that long, then go on: a slow task).
Spark tasks see the variable through
``spark.executorEnv.BFPACK_FAULTS_FILE``. Points: ``read``, ``read:<group>``, ``assemble`` and
``assemble:<group>`` (in tasks), ``plan``, ``staged``, ``commit:<table>``, ``remove:<table>`` (on the
driver), and ``drop_token``, which breaks an invariant on purpose so the audit must catch it.
"""

from __future__ import annotations

import json
import os
import signal
import time

ENV = "BFPACK_FAULTS_FILE"


class InjectedFault(RuntimeError):
    """A failure a test asked for."""


def _spec(point: str) -> str | None:
    path = os.environ.get(ENV)
    if not path or not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh).get(point)


def active(point: str) -> bool:
    """Whether ``point`` fires now; a ``once`` point fires for exactly one caller."""
    spec = _spec(point)
    if spec == "always":
        return True
    return spec == "once" and _fires_once(point)


def _fires_once(point: str) -> bool:
    try:
        os.close(os.open(f"{os.environ[ENV]}.{point.replace(':', '_')}.fired", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _java_ancestor() -> int | None:
    """The nearest ancestor process that is a JVM (a Python worker's executor), from /proc."""
    pid = os.getppid()
    while pid > 1:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as fh:
            if fh.read().strip() == "java":
                return pid
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            pid = int(fh.read().rsplit(")", 1)[1].split()[1])
    return None


def check(point: str) -> None:
    """Raise :class:`InjectedFault` when ``point`` fires (or kill the executor: see the module)."""
    spec = _spec(point)
    if spec == "hang":
        while True:
            time.sleep(1)
    if spec and spec.startswith("slow:"):
        time.sleep(float(spec.removeprefix("slow:")))
        return
    if spec == "kill-executor":
        executor = _java_ancestor()
        if executor is not None and _fires_once(point):
            os.kill(executor, signal.SIGKILL)
        return
    if active(point):
        raise InjectedFault(f"injected failure at {point}")
