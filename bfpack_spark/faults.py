"""Failure injection at named points, so tests can crash a run anywhere and rerun it.

Off unless the environment variable ``BFPACK_FAULTS_FILE`` names a JSON file that
maps point names to ``"once"`` (fail the first time the point is reached, on any
process) or ``"always"``. Spark tasks see the variable through
``spark.executorEnv.BFPACK_FAULTS_FILE``. Points: ``read`` and ``assemble`` (in
tasks), ``plan``, ``staged``, ``commit:<table>``, ``remove:<table>`` (on the driver), and
``drop_token``, which breaks an invariant on purpose so the audit must catch it.
"""

from __future__ import annotations

import json
import os

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
    if spec == "once":
        try:
            os.close(os.open(f"{os.environ[ENV]}.{point.replace(':', '_')}.fired",
                             os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False
    return False


def check(point: str) -> None:
    """Raise :class:`InjectedFault` when ``point`` fires."""
    if active(point):
        raise InjectedFault(f"injected failure at {point}")
