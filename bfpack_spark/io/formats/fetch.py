"""A read task's files, opened with the size the listing gave, the small ones read ahead.

Web corpora come as tens of thousands of small files. Read one after the other from an object
store, each costs a first-byte latency (tens of milliseconds) before its reader can start. So a
task reads the small files of its group (up to :data:`WHOLE_BYTES` each, in one request) in a few
threads ahead of its readers, in order and bounded (:data:`AHEAD_FILES` files and
:data:`AHEAD_BYTES` bytes at a time); larger files are streamed by ranged requests when their
turn comes. On a local disk the small files are read whole, without threads.

A file that cannot be read is handed on with its error: its reader makes it a reject.
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa

from bfpack_spark.io.formats.base import Split
from bfpack_spark.io.store.fs import is_local, open_input, read_bytes

#: a file at most this large is read whole, in one request
WHOLE_BYTES = 4 * 2**20
#: at most this many files, and bytes, are read ahead of the reader
AHEAD_FILES = 64
AHEAD_BYTES = 64 * 2**20
#: threads reading ahead in one task (they wait on the store, not on a core)
WORKERS = 16
#: a Parquet file not read ahead is opened with this many of its last bytes (its footer, in one request)
FOOTER_BYTES = 2**16


@dataclass
class Opened:
    """One split and its file's bytes when they were read ahead (``data``), or the error reading them."""

    split: Split
    data: bytes | None = None
    error: Exception | None = None

    def raw(self) -> Any:
        """The file from its first byte: a binary stream with ``read``, ``seek`` and ``close``."""
        if self.error is not None:
            raise self.error
        if self.data is not None:
            return io.BytesIO(self.data)
        return open_input(self.split.uri, self.split.size)

    def random_access(self) -> pa.NativeFile:
        """The file for random access (a Parquet footer, then its column chunks)."""
        if self.error is not None:
            raise self.error
        if self.data is not None:
            return pa.BufferReader(self.data)
        return open_input(self.split.uri, self.split.size, FOOTER_BYTES)

    def whole_file(self) -> Opened:
        """The same file read from its start (a piece after the first reads its file's first record)."""
        return Opened(replace(self.split, byte_range=None), self.data, self.error)


def _small(split: Split) -> bool:
    return split.whole and split.size <= WHOLE_BYTES


def _read(split: Split) -> bytes:
    return read_bytes(split.uri, split.size)


def _settled(split: Split, future: Future | None) -> Opened:
    if future is None:
        return Opened(split)
    try:
        return Opened(split, future.result())
    except Exception as exc:  # the reader makes it a reject
        return Opened(split, error=exc)


def opened(splits: list[Split]) -> Iterator[Opened]:
    """The splits in order, each with its file's bytes when small (read ahead on a remote store)."""
    if all(is_local(s.uri) for s in splits):
        for split in splits:
            if not _small(split):
                yield Opened(split)
                continue
            try:
                yield Opened(split, _read(split))
            except OSError as exc:
                yield Opened(split, error=exc)
        return
    pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="bfpack-read-ahead")
    pending: deque[tuple[Split, Future | None]] = deque()
    queued = iter(splits)
    ahead = 0
    try:
        while True:
            while len(pending) < AHEAD_FILES and ahead < AHEAD_BYTES:
                upcoming = next(queued, None)
                if upcoming is None:
                    break
                small = _small(upcoming)
                pending.append((upcoming, pool.submit(_read, upcoming) if small else None))
                ahead += upcoming.size if small else 0
            if not pending:
                return
            split, future = pending.popleft()
            ahead -= split.size if future is not None else 0
            yield _settled(split, future)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
