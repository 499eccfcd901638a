"""One run at a time per output root, so two runs never interleave their commits.

The lock is ``<root>/_bfpack.lock``, naming the run that holds it.

- Local or mounted file systems: a file created exclusively. A lock left by a run that
  died on this machine is taken over; one held by a live run, or by another machine, stops
  the new run with a message that says what to do.
- S3 (and S3-compatible stores that honour conditional writes): an object created with
  ``If-None-Match: *``, so exactly one of two runs creates it. The holder rewrites it every
  ``HEARTBEAT`` seconds (``If-Match`` its own last version); a lock whose heartbeat is older
  than ``EXPIRY`` belongs to a dead run and is taken over with ``If-Match`` on the stale
  version, so two runs cannot both take it over.
- Other stores (gs://, abfs://...): no lock; each table's commit is still atomic (Delta), and
  a warning says to keep one writer per output root.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time

from bfpack_spark.io.store import retry, s3

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


def _whoami(run_id: str) -> dict:
    return {"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _locked(holder: dict, root: str, where: str, extra: str = "") -> RunLockedError:
    who = (f"another bfpack run ({holder.get('run_id')}, process {holder.get('pid')} on {holder.get('host')}, "
           f"started {holder.get('started')}{extra})" if holder else "a run whose lock cannot be read")
    return RunLockedError(f"{who} is writing to {root}; wait for it, or delete {where} if that run is no "
                          f"longer alive")


class S3Lock:
    """The lock object on S3, created and refreshed with conditional writes (see the module)."""

    HEARTBEAT = 30.0
    EXPIRY = 150.0

    def __init__(self, root: str, run_id: str):
        try:
            self.client = s3.client(read_timeout=10)
        except ImportError:
            raise RunLockedError("the run lock on S3 needs boto3: pip install boto3") from None
        bucket_key = root.split("://", 1)[1]
        self.bucket, _, prefix = bucket_key.partition("/")
        self.key = posixpath.join(prefix.strip("/"), LOCK_NAME) if prefix.strip("/") else LOCK_NAME
        self.uri, self.root, self.run_id = f"s3://{self.bucket}/{self.key}", root, run_id
        self.etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({**_whoami(self.run_id), "heartbeat": time.time()}).encode()

    def _put(self, **condition) -> str | None:
        """Write the lock under ``condition``; its new ETag, or None when the condition failed.

        A write retried after its reply was lost meets its own first attempt, and fails the
        condition: it is recognised as ours when the object holds exactly this body."""
        from botocore.exceptions import ClientError

        body = self._body()

        def ours(exc: BaseException) -> bool:
            return _failed_condition(exc) and self._holder()[0] == json.loads(body)

        try:
            etag = retry.call(lambda: self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body,
                                                             **condition)["ETag"], f"lock {self.uri}", ours)
        except ClientError as exc:
            if _failed_condition(exc):
                return None
            raise
        return etag if etag is not None else self._holder()[1]

    def _holder(self) -> tuple[dict, str | None]:
        from botocore.exceptions import ClientError

        def get() -> tuple[dict, str]:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key)
            return json.loads(obj["Body"].read()), obj["ETag"]

        try:
            return retry.call(get, f"read {self.uri}")
        except (ClientError, ValueError):
            return {}, None

    def acquire(self) -> None:
        self.etag = self._put(IfNoneMatch="*")
        if self.etag is None:
            holder, etag = self._holder()
            age = time.time() - float(holder.get("heartbeat", 0))
            if etag is not None and age <= self.EXPIRY and holder.get("run_id") == self.run_id:
                holder, etag, age = self._outlive(holder, etag, age)
            if etag is None or age <= self.EXPIRY:
                raise _locked(holder, self.root, self.uri, f", last heartbeat {age:.0f}s ago; a lock expires "
                                                           f"{self.EXPIRY:.0f}s after its last heartbeat")
            self.etag = self._put(IfMatch=etag)
            if self.etag is None:
                raise _locked(self._holder()[0], self.root, self.uri)
            log.warning("took over the lock of run %s (no heartbeat for %.0fs)", holder.get("run_id"), age)
        self._thread = threading.Thread(target=self._beat, name="bfpack-lock-heartbeat", daemon=True)
        self._thread.start()

    def _outlive(self, holder: dict, etag: str, age: float) -> tuple[dict, str | None, float]:
        """The lock held by an earlier attempt of this same run (a driver lost, rerun): taken over at once where
        that attempt's process is gone from this machine, else once its heartbeat is older than EXPIRY (a
        live holder beats, and is then still the holder: the caller refuses)."""
        me = _whoami(self.run_id)
        if holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1))):
            return holder, etag, self.EXPIRY + 1
        log.info("waiting up to %.0fs for the lock of an earlier attempt of run %s (last heartbeat %.0fs ago)",
                 self.EXPIRY - age, self.run_id, age)
        while age <= self.EXPIRY:
            time.sleep(min(5.0, self.EXPIRY - age + 0.5))
            now, now_etag = self._holder()
            if now_etag != etag:  # it beat: alive
                return now, now_etag, time.time() - float(now.get("heartbeat", 0))
            age = time.time() - float(holder.get("heartbeat", 0))
        return holder, etag, age

    def _beat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT):
            etag = self._put(IfMatch=self.etag)
            if etag is None:
                log.error("lost the run lock %s: another run took it over", self.uri)
                return
            self.etag = etag

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder, etag = self._holder()
        if holder.get("run_id") == self.run_id and etag == self.etag:
            retry.call(lambda: self.client.delete_object(Bucket=self.bucket, Key=self.key), f"delete {self.uri}")


def _failed_condition(exc: BaseException) -> bool:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code")
    return code in ("PreconditionFailed", "ConditionalRequestConflict")


class OutputLock:
    def __init__(self, root: str, run_id: str):
        self.root, self.run_id = root, run_id
        self.local = "://" not in root or root.startswith("file://")
        self.s3 = root.startswith(("s3://", "s3a://"))
        self.path = os.path.join(root.removeprefix("file://"), LOCK_NAME)
        self.held = False
        self._s3: S3Lock | None = None

    def __enter__(self) -> OutputLock:
        if self.s3:
            self._s3 = S3Lock(self.root, self.run_id)
            self._s3.acquire()
            self.held = True
            return self
        if not self.local:
            log.warning("no run lock on %s: use one writer per output root", self.root)
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        me = _whoami(self.run_id)
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
                raise _locked(other, self.root, self.path) from None
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
        if self._s3 is not None:
            self._s3.release()
        elif self.held and self._holder().get("pid") == os.getpid():
            os.unlink(self.path)
        self.held = False
