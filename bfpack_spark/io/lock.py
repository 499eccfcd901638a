"""One run at a time per output root, so two runs never interleave their commits.

On a local or mounted file system the lock is a file created exclusively
(``<root>/_bfpack.lock``) that names the run holding it. A lock left by a run that
died on this machine is taken over; one held by a live run, or by another machine,
stops the new run with a message that says what to do. Object stores (``s3://``...)
have no exclusive create here: there, each table's commit is still atomic (Delta),
and a second writer must use a commit coordinator (delta-rs: ``AWS_S3_LOCKING_PROVIDER``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

log = logging.getLogger(__name__)

LOCK_NAME = "_bfpack.lock"


class RunLockedError(RuntimeError):
    """Another run is writing to the same output root."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    def __init__(self, root: str, run_id: str):
        self.root, self.run_id = root, run_id
        self.local = "://" not in root or root.startswith("file://")
        self.path = os.path.join(root.removeprefix("file://"), LOCK_NAME)
        self.held = False

    def __enter__(self) -> OutputLock:
        if not self.local:
            log.warning("no run lock on %s: use one writer per output root", self.root)
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        me = {"run_id": self.run_id, "pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                other = self._holder()
                if other.get("host") == me["host"] and not _alive(int(other.get("pid", -1))):
                    log.warning("taking over the lock of run %s (process %s is gone)",
                                other.get("run_id"), other.get("pid"))
                    os.unlink(self.path)
                    continue
                holder = (f"another bfpack run ({other.get('run_id')}, process {other.get('pid')} on "
                          f"{other.get('host')}, started {other.get('started')})" if other
                          else "a run whose lock file cannot be read")
                raise RunLockedError(f"{holder} is writing to {self.root}; wait for it, or delete "
                                     f"{self.path} if that run is no longer alive") from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return self
        raise RunLockedError(f"could not take the lock {self.path}")

    def _holder(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return {}

    def __exit__(self, *exc) -> None:
        if self.held and self._holder().get("pid") == os.getpid():
            os.unlink(self.path)
        self.held = False
