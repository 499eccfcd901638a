"""File systems for every URI bfpack reads or writes (local paths, ``s3://``, ``gs://``, ``file://``),
each request to an object store retried by kind (:mod:`.retry`); the run's storage options.

Tasks and the driver alike open files here: :func:`filesystem` for pyarrow's file systems,
:func:`open_input` and :func:`read_bytes` for an input file whose size the listing gave (on S3 one
ranged ``GET`` per read, no ``HEAD``: :mod:`.s3`).
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import re
import uuid
from collections.abc import Iterator
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from bfpack_spark.errors import InputError
from bfpack_spark.io.store import retry, s3

#: The environment variable that carries ``output.storage_options`` (JSON) to every process of
#: a run: the driver sets it before Spark starts, and Spark passes it to executors.
STORAGE_ENV = "BFPACK_STORAGE_OPTIONS"
#: pyarrow's S3 client makes each request once: :mod:`~bfpack_spark.io.store.retry` retries it by kind
#: (and counts it), so a wrong endpoint still fails in seconds. Uploads are the exception (below).
S3_ATTEMPTS = 0
#: The upload parts inside one of pyarrow's output streams cannot be re-sent from outside it, so its
#: client retries them itself (backoff 25 ms * 2**n): this many attempts span about 3 minutes.
S3_UPLOAD_ATTEMPTS = 13
#: A read fetches at least this much at a time (one ranged GET), so small reads stay few requests.
READ_AHEAD = 2**20


def storage_options() -> dict[str, str]:
    """The run's ``storage_options`` (delta-rs names: ``AWS_ENDPOINT_URL``, ``AWS_REGION``, ...)."""
    return {k.upper(): str(v) for k, v in json.loads(os.environ.get(STORAGE_ENV) or "{}").items()}


def delta_storage_options() -> dict[str, str]:
    """The storage options for delta-rs: the run's, over delta-rs's own retries (every request it makes)
    sized like ours (:mod:`.retry`)."""
    p = retry.policy()
    return {"max_retries": str(p.attempts - 1), "retry_timeout": f"{p.seconds:g}s", **storage_options()}


def set_storage_options(options: dict[str, str]) -> None:
    """Make ``options`` the storage options of this process and of the Spark processes it starts."""
    if options:
        os.environ[STORAGE_ENV] = json.dumps(options, sort_keys=True)
    else:
        os.environ.pop(STORAGE_ENV, None)


def s3_settings() -> dict[str, str]:
    """S3 endpoint, region and credentials: the storage options over the standard ``AWS_*``
    environment, by delta-rs's names. The pyarrow file system and the S3 run lock both use it."""
    return {**{k: v for k, v in os.environ.items() if k.startswith("AWS_")}, **storage_options()}


def _s3(bucket_path: str) -> tuple[pafs.FileSystem, str]:
    """S3 through pyarrow, with :func:`s3_settings`, every request retried by kind."""
    settings = json.dumps(s3_settings(), sort_keys=True)
    return _retrying(_s3_filesystem(settings, S3_ATTEMPTS), _s3_filesystem(settings, S3_UPLOAD_ATTEMPTS)), bucket_path


@functools.lru_cache(maxsize=8)
def _s3_filesystem(settings_json: str, attempts: int) -> pafs.FileSystem:
    """One S3 client per distinct setting (a table of many files opens it once)."""
    opts = json.loads(settings_json)
    get = lambda *names: next((opts[n] for n in names if n in opts), None)  # noqa: E731
    # the default strategy: no retry quota, which a burst of throttling would drain
    kwargs: dict = {"retry_strategy": pafs.AwsDefaultS3RetryStrategy(max_attempts=attempts)}
    endpoint = get("AWS_ENDPOINT_URL", "AWS_ENDPOINT", "ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    region = get("AWS_REGION", "AWS_DEFAULT_REGION", "REGION")
    if region:
        kwargs["region"] = region
    key, secret = get("AWS_ACCESS_KEY_ID"), get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=get("AWS_SESSION_TOKEN"))
    if (virtual := get("AWS_VIRTUAL_HOSTED_STYLE_REQUEST")) is not None:
        kwargs["force_virtual_addressing"] = virtual.lower() == "true"
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow file system and path for a local path or a URI (s3://, gs://, file://)."""
    if uri.startswith(("s3://", "s3a://")):
        return _s3(uri.split("://", 1)[1])
    if "://" in uri:
        try:
            fs, path = pafs.FileSystem.from_uri(uri)
        except Exception as exc:  # pyarrow raises several types for unsupported schemes
            raise InputError(f"cannot open {uri!r}: {exc}") from None
        return (fs, path) if isinstance(fs, pafs.LocalFileSystem) else (_retrying(fs, fs), path)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _retrying(fs: pafs.FileSystem, upload_fs: pafs.FileSystem) -> pafs.FileSystem:
    return pafs.PyFileSystem(RetryingStore(fs, upload_fs))


def _missing(exc: BaseException) -> bool:
    """The error of a request on an object that is not there (any more)."""
    return isinstance(exc, FileNotFoundError) or re.search(
        r"does not exist|NoSuchKey|NoSuchUpload|not found|NOT_FOUND|\b404\b", str(exc), re.IGNORECASE) is not None


def make_dirs(fs: pafs.FileSystem, path: str) -> None:
    """Make the folder ``path`` and its parents on local disk; on an object store a folder is only a prefix
    of keys: no marker objects, no requests (each a chance to be throttled)."""
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(path, recursive=True)


class RetryingStore(pafs.FileSystemHandler):
    """An object store's pyarrow file system with every request retried by kind (:mod:`.retry`).

    What pyarrow's client cannot do itself is added here: a read cut off mid-response is resumed
    at its offset; a delete whose object is already gone is done; an upload whose completion was
    lost is recognised as done when the object is there with every byte written.
    """

    def __init__(self, fs: pafs.FileSystem, upload_fs: pafs.FileSystem):
        self.fs, self.upload_fs = fs, upload_fs

    def __eq__(self, other) -> bool:
        return isinstance(other, RetryingStore) and self.fs.equals(other.fs)

    def _call(self, what: str, request, settled=None):
        return retry.call(request, f"{self.fs.type_name} {what}", settled)

    def get_type_name(self) -> str:
        return f"retrying-{self.fs.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def equals(self, other) -> bool:
        return self == other

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self._call(f"info {paths[0]}", lambda: self.fs.get_file_info(paths))

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self._call(f"list {selector.base_dir}", lambda: self.fs.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self._call(f"mkdir {path}", lambda: self.fs.create_dir(path, recursive=recursive))

    def delete_dir(self, path: str) -> None:
        self._call(f"delete {path}/", lambda: self.fs.delete_dir(path), _missing)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._call(f"delete {path}/*", lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok),
                   _missing)

    def delete_root_dir_contents(self) -> None:
        raise OSError("bfpack never deletes a whole bucket")

    def delete_file(self, path: str) -> None:
        self._call(f"delete {path}", lambda: self.fs.delete_file(path), _missing)

    def move(self, src: str, dest: str) -> None:
        self._call(f"move {src}", lambda: self.fs.move(src, dest),
                   lambda exc: _missing(exc) and self.fs.get_file_info(dest).type == pafs.FileType.File)

    def copy_file(self, src: str, dest: str) -> None:
        self._call(f"copy {src}", lambda: self.fs.copy_file(src, dest))

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return pa.PythonFile(_ResumedReader(self, path), mode="r")

    def open_input_file(self, path: str) -> pa.NativeFile:
        return pa.PythonFile(_ResumedReader(self, path), mode="r")

    def open_output_stream(self, path: str, metadata) -> pa.NativeFile:
        return pa.PythonFile(_RecognisedWriter(self, path, metadata), mode="w")

    def open_append_stream(self, path: str, metadata) -> pa.NativeFile:
        raise OSError(f"{self.fs.type_name} cannot append to {path}")


class _BlockReader:
    """A file-like reader of a file of known size by ranged requests of at least :data:`READ_AHEAD`
    bytes (a small read and the next one share a request); subclasses make the request."""

    def __init__(self, size: int):
        self.size, self.pos, self.closed = size, 0, False
        self._block, self._block_at = b"", 0

    def _read_at(self, offset: int, n: int) -> bytes:
        raise NotImplementedError

    def prime(self, offset: int, data: bytes) -> None:
        """Hold ``data``, the bytes from ``offset``, for the reads that fall in them."""
        self._block_at, self._block = offset, data

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        if n <= 0:
            return b""
        start = self.pos - self._block_at
        if not (0 <= start and start + n <= len(self._block)):
            self._block_at = self.pos
            self._block = self._read_at(self.pos, min(max(n, READ_AHEAD), self.size - self.pos))
            start = 0
        data = self._block[start:start + n]
        self.pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: 0, 1: self.pos, 2: self.size}[whence] + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed, self._block = True, b""


class _ResumedReader(_BlockReader):
    """A file of a pyarrow file system read by ranged requests, each retried by kind; a request cut
    off mid-response is made again from the same offset on a newly opened file (pyarrow's client does
    not retry it)."""

    def __init__(self, store: RetryingStore, path: str):
        self.store, self.path = store, path
        self._file: pa.NativeFile | None = store._call(f"open {path}", lambda: store.fs.open_input_file(path))
        super().__init__(self._file.size())

    def _read_at(self, offset: int, n: int) -> bytes:
        def request() -> bytes:
            if self._file is None:
                self._file = self.store.fs.open_input_file(self.path)
            try:
                return self._file.read_at(n, offset)
            except Exception:
                self._file = None  # re-opened for the next attempt
                raise

        return self.store._call(f"read {self.path} at {offset}", request)

    def close(self) -> None:
        super().close()
        self._file = None


class _RecognisedWriter:
    """pyarrow's output stream (its client retries the upload's parts), whose completion, if its
    reply is lost, is recognised as done once the object is there with every byte written."""

    def __init__(self, store: RetryingStore, path: str, metadata):
        self.store, self.path, self.written, self.closed = store, path, 0, False
        self._out = store._call(f"create {path}", lambda: store.upload_fs.open_output_stream(path, metadata=metadata))

    def write(self, data) -> int:
        self._out.write(data)
        self.written += len(data)
        return len(data)

    def flush(self) -> None:
        self._out.flush()

    def tell(self) -> int:
        return self.written

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._out.close()
        except Exception as exc:
            if not retry.transient(exc) and not _missing(exc):
                raise
            info = self.store.get_file_info([self.path])[0]
            if info.type != pafs.FileType.File or info.size != self.written:
                raise


def join(root: str, *parts: str) -> str:
    """``root/part/...`` for a local path or a URI."""
    return posixpath.join(root.rstrip("/"), *parts) if "://" in root else os.path.join(root, *parts)


def read_parquet(uri: str, columns: list[str] | None = None):
    """A whole Parquet file (of a table's snapshot) as a pyarrow Table, on any store."""
    import pyarrow.parquet as pq

    fs, path = filesystem(uri)
    return pq.read_table(path, columns=columns, filesystem=fs)


def parquet_row_groups(uri: str, columns: list[str]) -> Iterator[pa.Table]:
    """A Parquet file's row groups, read one at a time as they are asked for, on any store: the memory
    of a reader that goes through the file is one row group."""
    import pyarrow.parquet as pq

    fs, path = filesystem(uri)
    with fs.open_input_file(path) as source:
        parquet = pq.ParquetFile(source)
        for i in range(parquet.num_row_groups):
            yield parquet.read_row_group(i, columns=columns)


def is_local(uri: str) -> bool:
    """Whether ``uri`` is a path on a local (or mounted) file system."""
    return "://" not in uri or uri.startswith("file://")


def read_bytes(uri: str, size: int, start: int = 0, end: int | None = None) -> bytes:
    """Bytes ``[start, end)`` of a file whose ``size`` the listing gave: one request on S3 (no ``HEAD``)."""
    end = size if end is None else min(end, size)
    if uri.startswith(("s3://", "s3a://")):
        return s3.get_range(*s3.split_uri(uri), start, end)
    if is_local(uri):
        with open(uri.removeprefix("file://"), "rb") as fh:
            fh.seek(start)
            return fh.read(max(0, end - start))
    fs, path = filesystem(uri)
    with fs.open_input_file(path) as fh:
        return fh.read_at(max(0, end - start), start)


def open_input(uri: str, size: int, tail: int = 0) -> pa.NativeFile:
    """A file whose ``size`` the listing gave, for random access: on S3 read by ranged ``GET`` s of at
    least :data:`READ_AHEAD` bytes, without the ``HEAD`` pyarrow's S3 file system opens a file with;
    ``tail``: its last bytes are read at once (a Parquet footer: its length, then the footer, one request)."""
    if uri.startswith(("s3://", "s3a://")):
        reader = _RangedObject(uri, size)
        if tail:
            start = max(0, size - tail)
            reader.prime(start, reader._read_at(start, size - start))
        return pa.PythonFile(reader, mode="r")
    if is_local(uri):
        return pa.OSFile(uri.removeprefix("file://"))
    fs, path = filesystem(uri)
    return fs.open_input_file(path)


class _RangedObject(_BlockReader):
    """An S3 object of known size, read by ranged ``GET`` s (:func:`.s3.get_range`: no ``HEAD``)."""

    def __init__(self, uri: str, size: int):
        self.bucket, self.key = s3.split_uri(uri)
        super().__init__(size)

    def _read_at(self, offset: int, n: int) -> bytes:
        return s3.get_range(self.bucket, self.key, offset, offset + n)


def check_writable(root: str) -> None:
    """Fail early, with one line, when the output root cannot be written."""
    if not is_local(root):
        fs, path = filesystem(root)
        probe = posixpath.join(path, f"_bfpack.probe-{uuid.uuid4().hex[:8]}")
        try:  # the bucket exists, and an object can be written and removed there
            fs.create_dir(path, recursive=True)
            with fs.open_output_stream(probe) as out:
                out.write(b"probe")
            fs.delete_file(probe)
        except Exception as exc:
            raise InputError(f"cannot write to the output root {root!r}: {exc}") from None
        return
    path = root.removeprefix("file://")
    try:
        created = not os.path.isdir(path)
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".bfpack-write-test")
        with open(probe, "w"):
            pass
        os.unlink(probe)
        if created:  # a run that stops before writing leaves no empty output root behind
            os.rmdir(path)
    except OSError as exc:
        raise InputError(f"cannot write to the output root {root!r}: {exc.strerror or exc}") from None

