"""Retries by kind, for every request bfpack makes to an object store (tasks and driver alike).

A store that throttles (``503 SlowDown``, ``429``, ``RequestLimitExceeded``) or drops a connection
answers the same request correctly a moment later; a wrong endpoint, bucket or credentials never
will. So a request is retried only when its error is of the first kind, with exponential backoff
and full jitter, for up to ``attempts`` attempts and ``seconds`` seconds (defaults in line with
Hadoop S3A's 20 attempts and delta-rs's 3 minutes); any other error is raised at once, which keeps
the preflight's answer for a mistake fast.

A retried request may have taken effect the first time (the reply was lost, not the request).
Callers say what a later attempt's error then means with ``settled``: a delete that finds the
object gone, or a conditional put that finds its own write, is done.

The settings reach Spark's processes through :data:`RETRY_ENV` (set by the driver before Spark
starts); :func:`retried` counts the requests this process re-issued, for the run's summary.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeVar, overload

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_ENV = "BFPACK_RETRIES"

#: errors that are the store's (or the network's) passing trouble: retried
TRANSIENT = re.compile(
    r"slow_?down|throttl|too_?many_?requests|request_?limit_?exceeded|\b429\b|\b50[0234]\b|service[ _]?unavailable|"
    r"internal_?error|internal_?failure|network_?connection|connection (reset|aborted|closed)|broken pipe|"
    r"timed? ?out|request_?time_?out|flush response stream|returned nothing|curlCode: (18|28|52|55|56)\b|"
    r"IncompleteRead|RemoteDisconnected|error sending request|error decoding response body|"
    r"ConnectionClosedError|ReadTimeoutError|unexpected EOF|UNEXPECTED_EOF_WHILE_READING|EOF occurred in violation|"
    r"Connection was closed|"
    r"Generic S3 error", re.IGNORECASE)  # delta-rs (object_store): what its own retries left, or a body cut off
#: errors that say the request can never succeed as made: raised at once, even when they look transient
PERMANENT = re.compile(
    r"curlCode: (6|7)\b|could ?n[o']t (resolve|connect)|connection refused|NoSuchBucket|AccessDenied|ACCESS_DENIED|"
    r"InvalidAccessKeyId|SignatureDoesNotMatch|InvalidToken|ExpiredToken|Forbidden|\b403\b|"
    r"Could not connect to the endpoint", re.IGNORECASE)


@dataclass(frozen=True)
class RetryPolicy:
    """How long a transient error is retried: ``attempts`` in all, within ``seconds`` of the first."""

    attempts: int = 20
    seconds: float = 180.0
    first_backoff: float = 0.1
    max_backoff: float = 15.0

    def backoff(self, retry: int) -> float:
        """Full jitter (uniform in [0, min(max_backoff, first_backoff * 2**retry)]): clients that
        were throttled together do not come back together."""
        return random.uniform(0.0, min(self.max_backoff, self.first_backoff * 2 ** retry))


def policy() -> RetryPolicy:
    """This process's policy: :data:`RETRY_ENV` (set by the run), else the defaults."""
    text = os.environ.get(RETRY_ENV)
    return RetryPolicy(**json.loads(text)) if text else RetryPolicy()


def set_policy(p: RetryPolicy) -> None:
    """Make ``p`` the policy of this process and of the Spark processes it starts."""
    os.environ[RETRY_ENV] = json.dumps(asdict(p), sort_keys=True)


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` is an error a later attempt of the same request may not meet: as the error says
    (its ``transient``, where it was classified where it was made), else by its text."""
    said = getattr(exc, "transient", None)
    if isinstance(said, bool):
        return said
    if isinstance(exc, (FileNotFoundError, PermissionError)):  # whatever its text says (a path may say "throttled")
        return False
    text = f"{type(exc).__name__}: {exc}"
    return not PERMANENT.search(text) and TRANSIENT.search(text) is not None


_count = 0
_count_lock = threading.Lock()


def retried() -> int:
    """How many requests this process has re-issued since it started."""
    return _count


def _counted() -> None:
    global _count
    with _count_lock:
        _count += 1


@overload
def call(request: Callable[[], T], what: str, settled: None = None, p: RetryPolicy | None = None) -> T: ...


@overload
def call(request: Callable[[], T], what: str, settled: Callable[[BaseException], bool],
         p: RetryPolicy | None = None) -> T | None: ...


def call(request: Callable[[], T], what: str, settled: Callable[[BaseException], bool] | None = None,
         p: RetryPolicy | None = None) -> T | None:
    """``request()``, retried while it fails with a transient error (see the module).

    ``settled(exc)``, asked only of an attempt after a transient failure, says that the earlier
    attempt took effect and ``exc`` means the request is done: ``call`` then returns None.
    """
    p = p or policy()
    start = time.monotonic()
    for attempt in range(1, p.attempts + 1):
        try:
            return request()
        except Exception as exc:
            if attempt > 1 and settled is not None and settled(exc):
                log.debug("%s: done by an earlier attempt (%s)", what, _line(exc))
                return None
            wait = p.backoff(attempt - 1)
            if not transient(exc) or attempt == p.attempts or time.monotonic() - start + wait > p.seconds:
                raise
            log.debug("%s: %s; retry %d of %d in %.2fs", what, _line(exc), attempt, p.attempts - 1, wait)
            time.sleep(wait)
            _counted()
    raise AssertionError("unreachable")  # the loop returns or raises


def _line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
