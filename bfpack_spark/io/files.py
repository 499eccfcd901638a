"""Where input and output live: files, URIs, and the pieces of input one task reads."""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

import pyarrow.fs as pafs


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


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow file system and path for a local path or a URI (s3://, gs://, file://)."""
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except Exception as exc:  # pyarrow raises several types for unsupported schemes
            raise InputError(f"cannot open {uri!r}: {exc}") from None
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(root: str, *parts: str) -> str:
    """``root/part/...`` for a local path or a URI."""
    return posixpath.join(root.rstrip("/"), *parts) if "://" in root else os.path.join(root, *parts)
