"""Where input and output live: files, URIs, and the pieces of input one task reads."""

from __future__ import annotations

import functools
import json
import os
import posixpath
import re
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

#: The environment variable that carries ``output.storage_options`` (JSON) to every process of
#: a run: the driver sets it before Spark starts, and Spark passes it to executors.
STORAGE_ENV = "BFPACK_STORAGE_OPTIONS"
#: Option names whose values are never logged or stored (the stats table keeps the config).
SECRET = re.compile(r"secret|token|password|key", re.IGNORECASE)
#: Object-store requests are retried this many times: a wrong endpoint fails in seconds.
S3_ATTEMPTS = 3


class InputError(ValueError):
    """The input cannot be read as configured; the message says what to change."""


@dataclass(frozen=True)
class Split:
    """A piece of one input file that one task reads."""

    uri: str
    source: str                      # stable name: the file's path relative to its input root
    format: str                      # "jsonl", "parquet" or "text" (one document per file)
    compression: str | None = None   # JSON lines: "gzip", "zstd" or None
    row_groups: tuple[int, ...] | None = ()  # Parquet: the row groups to read (None: all; footer unread)
    first_row: int = 0               # Parquet: index in the file of the first row read
    byte_range: tuple[int, int] | None = None  # uncompressed JSON lines: [start, end)
    has_ids: bool = False            # JSON lines: the file's first record has the id field
    est_items: int = 1


@dataclass(frozen=True)
class InputFile:
    uri: str
    source: str
    size: int
    format: str
    compression: str | None = None


def storage_options() -> dict[str, str]:
    """The run's ``storage_options`` (delta-rs names: ``AWS_ENDPOINT_URL``, ``AWS_REGION``, ...)."""
    return {k.upper(): str(v) for k, v in json.loads(os.environ.get(STORAGE_ENV) or "{}").items()}


def set_storage_options(options: dict[str, str]) -> None:
    """Make ``options`` the storage options of this process and of the Spark processes it starts."""
    if options:
        os.environ[STORAGE_ENV] = json.dumps(options, sort_keys=True)
    else:
        os.environ.pop(STORAGE_ENV, None)


def redacted(options: dict[str, str]) -> dict[str, str]:
    return {k: ("***" if SECRET.search(k) else v) for k, v in options.items()}


def s3_settings() -> dict[str, str]:
    """S3 endpoint, region and credentials: the storage options over the standard ``AWS_*``
    environment, by delta-rs's names. The pyarrow file system and the S3 run lock both use it."""
    return {**{k: v for k, v in os.environ.items() if k.startswith("AWS_")}, **storage_options()}


def _s3(bucket_path: str) -> tuple[pafs.FileSystem, str]:
    """S3 through pyarrow, with :func:`s3_settings`."""
    return _s3_filesystem(json.dumps(s3_settings(), sort_keys=True)), bucket_path


@functools.lru_cache(maxsize=4)
def _s3_filesystem(settings_json: str) -> pafs.FileSystem:
    """One S3 client per distinct setting (a table of many files opens it once)."""
    opts = json.loads(settings_json)
    get = lambda *names: next((opts[n] for n in names if n in opts), None)  # noqa: E731
    kwargs: dict = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS)}
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
            return pafs.FileSystem.from_uri(uri)
        except Exception as exc:  # pyarrow raises several types for unsupported schemes
            raise InputError(f"cannot open {uri!r}: {exc}") from None
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(root: str, *parts: str) -> str:
    """``root/part/...`` for a local path or a URI."""
    return posixpath.join(root.rstrip("/"), *parts) if "://" in root else os.path.join(root, *parts)


def read_parquet(uri: str, columns: list[str] | None = None):
    """A whole Parquet file (of a table's snapshot) as a pyarrow Table, on any store."""
    import pyarrow.parquet as pq

    fs, path = filesystem(uri)
    return pq.read_table(path, columns=columns, filesystem=fs)


JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}


def detect_format(path: str) -> tuple[str, str | None] | None:
    """("jsonl"|"parquet", compression) from the file name, or None when unknown."""
    name = path.lower()
    compression = None
    for suffix, codec in COMPRESSION_SUFFIXES.items():
        if name.endswith(suffix):
            compression, name = codec, name[: -len(suffix)]
    if name.endswith(".parquet") and compression is None:
        return "parquet", None
    if any(name.endswith(s) for s in JSONL_SUFFIXES):
        return "jsonl", compression
    return None
