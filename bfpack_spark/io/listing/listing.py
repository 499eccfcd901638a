"""Finding the input files: what each input argument names, from listings alone.

Every argument (a file, a directory, a glob, a Delta table, ``python-stdlib``) is listed in a
thread pool, and on S3 every top-level prefix of a directory too, a thousand keys per request. No
input file is opened: each is known by what its listing says, its name relative to its input root
(``source``), its size, its modification time and, on S3, its ETag. That is what the run's identity
and an incremental run's choice of new files are made of (:meth:`Listing.identity`).

The files are held as columns (:class:`Listing`, an Arrow table sorted by source), not as an
object each: a million input files take about a hundred and fifty bytes each on the driver.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import posixpath
import re
import sysconfig
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from bfpack_spark.constants import PYTHON_STDLIB
from bfpack_spark.errors import InputError
from bfpack_spark.io.formats.base import detect_format
from bfpack_spark.io.store import s3
from bfpack_spark.io.store.fs import delta_storage_options, filesystem, is_local, join, read_bytes

#: threads listing input arguments and prefixes at once (each waits on the store)
LIST_THREADS = 16
#: files made into columns at a time
CHUNK_FILES = 65_536

#: One row per input file.
LISTING = pa.schema([
    ("uri", pa.string()),
    ("source", pa.string()),           # the file's path relative to its input root: its stable name
    ("size", pa.int64()),
    ("modified_ns", pa.int64()),       # modification time, ns since the epoch (as the store gives it)
    ("etag", pa.string()),             # S3's ETag; null elsewhere
    ("format", pa.string()),           # "jsonl", "parquet" or "text"
    ("compression", pa.string()),      # JSON lines: "gzip", "zstd" or null
])

#: (relative name, size, modified ns, etag) of one listed file
_Row = tuple[str, int, int, str | None]


@dataclass(frozen=True)
class Listing:
    """The input files of a run, sorted by source (see :data:`LISTING`)."""

    table: pa.Table

    def __len__(self) -> int:
        return self.table.num_rows

    def column(self, name: str) -> list:
        return self.table.column(name).to_pylist()

    def where(self, name: str, value: str | None) -> np.ndarray:
        """Whether each file's ``name`` column holds ``value`` (None: holds a value)."""
        column = self.table.column(name)
        found = pc.is_valid(column) if value is None else pc.fill_null(pc.equal(column, value), False)
        return found.to_numpy(zero_copy_only=False)

    def total_bytes(self) -> int:
        return int(pc.sum(self.table.column("size")).as_py() or 0)

    def identity(self) -> Iterator[tuple[str, int, str]]:
        """(source, size, version) of every file, the version its ETag where the store gives one, else its
        modification time: what the run id is made of (the same files, however their location is spelled)."""
        versions = pc.coalesce(self.table.column("etag"), pc.cast(self.table.column("modified_ns"), pa.string()))
        yield from zip(self.column("source"), self.column("size"), versions.to_pylist())


def glob_regex(pattern: str) -> re.Pattern:
    """A glob as a regex with the local file system's meaning: ``*`` and ``?`` stay within one
    path segment, ``**`` spans any number of them, ``[...]`` is a character class."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1:]:
            end = pattern.index("]", i + 1)
            out.append("[" + pattern[i + 1:end].replace("!", "^", 1) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _walk_local(root: str, max_depth: int | None = None) -> Iterator[_Row]:
    """Every file under a local directory (hidden ones skipped), by ``os.scandir``."""
    stack = [("", 0)]
    while stack:
        rel_dir, depth = stack.pop()
        try:
            entries = list(os.scandir(os.path.join(root, rel_dir) if rel_dir else root))
        except OSError as exc:
            raise InputError(f"cannot list {os.path.join(root, rel_dir)!r}: {exc.strerror or exc}") from None
        for entry in entries:
            if entry.name.startswith((".", "_")):
                continue
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if entry.is_dir():
                if max_depth is None or depth < max_depth:
                    stack.append((rel, depth + 1))
            elif entry.is_file():
                st = entry.stat()
                yield rel, st.st_size, st.st_mtime_ns, None


def _stdlib(root: str) -> Iterator[_Row]:
    """The running Python's standard-library sources (``.py``; not site-packages): a real, long-tailed code
    corpus on every machine."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "__pycache__")]
        for name in filenames:
            if name.endswith(".py"):
                st = os.stat(os.path.join(dirpath, name))
                yield os.path.relpath(os.path.join(dirpath, name), root), st.st_size, st.st_mtime_ns, None


def _list_s3_prefix(bucket: str, prefix: str, pool: ThreadPoolExecutor) -> Iterator[_Row]:
    """Every object under ``prefix``, its top-level prefixes listed at once (one request per thousand keys)."""
    top, prefixes = s3.list_objects(bucket, prefix, "/")
    deeper = [p for p in prefixes if not _hidden(p[len(prefix):].rstrip("/"))]
    for o in top:
        yield o.key[len(prefix):], o.size, o.modified_ns, o.etag
    for objects, _ in pool.map(lambda p: s3.list_objects(bucket, p), deeper):
        for o in objects:
            yield o.key[len(prefix):], o.size, o.modified_ns, o.etag


def _list_store(base: str, pool: ThreadPoolExecutor, max_depth: int | None = None) -> Iterator[_Row]:
    """Every non-hidden file under the directory ``base`` (a local path or a URI)."""
    if base.startswith(("s3://", "s3a://")):
        bucket, key = s3.split_uri(base)
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        rows: Iterable[_Row] = _list_s3_prefix(bucket, prefix, pool)
    elif is_local(base):
        path = base.removeprefix("file://")
        rows = _walk_local(path, max_depth) if os.path.isdir(path) else iter(())
    else:
        fs, path = filesystem(base)
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        rows = ((posixpath.relpath(i.path, path), i.size, i.mtime_ns or 0, None)
                for i in infos if i.type == pafs.FileType.File)
    return (r for r in rows if not _hidden(r[0]))


def _kind(base: str) -> tuple[str, _Row | None]:
    """("file", its row), ("dir", None) or ("missing", None): what a path or URI without glob characters names."""
    if base.startswith(("s3://", "s3a://")):
        bucket, key = s3.split_uri(base)
        if key and not key.endswith("/"):
            first = s3.list_objects(bucket, key, max_keys=1)[0]  # the key itself sorts first
            if first and first[0].key == key:
                return "file", (posixpath.basename(key), first[0].size, first[0].modified_ns, first[0].etag)
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        return ("dir" if not prefix or s3.list_objects(bucket, prefix, max_keys=1)[0] else "missing"), None
    if is_local(base):
        path = base.removeprefix("file://")
        if os.path.isfile(path):
            st = os.stat(path)
            return "file", (os.path.basename(path), st.st_size, st.st_mtime_ns, None)
        return ("dir" if os.path.isdir(path) else "missing"), None
    fs, path = filesystem(base)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return "file", (posixpath.basename(path), info.size, info.mtime_ns or 0, None)
    return ("dir" if info.type == pafs.FileType.Directory else "missing"), None


def _is_delta(base: str) -> bool:
    if base.startswith(("s3://", "s3a://")):
        bucket, key = s3.split_uri(base)
        return bool(s3.list_objects(bucket, key.rstrip("/") + "/_delta_log/", max_keys=1)[0])
    if is_local(base):
        return os.path.isdir(os.path.join(base.removeprefix("file://"), "_delta_log"))
    fs, path = filesystem(base)
    return fs.get_file_info(posixpath.join(path, "_delta_log")).type == pafs.FileType.Directory


def _delta_files(uri: str) -> pa.Table:
    from deltalake import DeltaTable

    try:
        table = DeltaTable(uri, storage_options=delta_storage_options())
    except Exception as exc:
        raise InputError(f"cannot open Delta table {uri!r}: {exc}") from None
    unsupported = set(table.protocol().reader_features or []) & {"deletionVectors", "columnMapping"}
    if unsupported:
        raise InputError(
            f"Delta table {uri!r} uses {', '.join(sorted(unsupported))}, which bfpack does not read; "
            f"rewrite it without them (e.g. REORG TABLE ... APPLY (PURGE)) or export it to Parquet")
    adds = pa.table(table.get_add_actions(flatten=True))
    name = posixpath.basename(uri.rstrip("/"))
    paths = adds.column("path").to_pylist()
    return _table([join(uri, p) for p in paths], [f"{name}/{p}" for p in paths], adds.column("size_bytes"),
                  pc.multiply(adds.column("modification_time"), 10**6), None, ["parquet"] * len(paths),
                  [None] * len(paths))


def _table(uris, sources, sizes, modified, etags, formats, compressions) -> pa.Table:
    n = len(uris)
    return pa.table([pa.array(uris, pa.string()), pa.array(sources, pa.string()), pa.array(sizes, pa.int64()),
                     pa.array(modified, pa.int64()),
                     pa.nulls(n, pa.string()) if etags is None else pa.array(etags, pa.string()),
                     pa.array(formats, pa.string()), pa.array(compressions, pa.string())], schema=LISTING)


def _typed(spec: str, base: str, rows: Iterable[_Row], fmt: str, named: bool) -> pa.Table:
    """The data files among ``rows`` (relative to ``base``) with their format; ``named``: the argument
    names this one file, so its format must be known. Made into columns a chunk of files at a time, so
    that a million files never stand as Python objects at once."""
    chunks: list[pa.Table] = []
    skipped: dict[str, int] = {}  # files of no format bfpack reads, by suffix
    rows = iter(rows)
    while chunk := list(itertools.islice(rows, CHUNK_FILES)):
        chunks.append(_typed_chunk(spec, base, chunk, fmt, named=named, skipped=skipped))
    if skipped and not any(c.num_rows for c in chunks):  # files there, none of them data files bfpack reads
        suffixes = sorted(skipped)
        raise InputError(f"input {spec!r} holds {sum(skipped.values()):,} files but none is .jsonl, .json[.gz|.zst] or "
                         f".parquet (found {', '.join(suffixes[:5])}{', ...' if len(suffixes) > 5 else ''}); "
                         "for plain text files, one document each, add --input-format text")
    return pa.concat_tables(chunks) if chunks else LISTING.empty_table()


def _typed_chunk(spec: str, base: str, rows: list[_Row], fmt: str, *, named: bool,
                 skipped: dict[str, int]) -> pa.Table:
    uris, sources, sizes, modified, etags, formats, compressions = [], [], [], [], [], [], []
    for rel, size, mtime, etag in rows:
        uri = spec if named else join(base, rel)
        detected = detect_format(rel)
        if fmt == "text":
            detected = ("text", None)
        elif fmt in ("jsonl", "parquet"):
            detected = (fmt, detected[1] if detected else None)
        elif detected is None:
            if named:
                raise InputError(f"cannot tell the format of {spec!r} from its name; set --input-format")
            suffix = posixpath.splitext(rel)[1] or posixpath.basename(rel)  # READMEs, _SUCCESS, ... may lie beside
            skipped[suffix] = skipped.get(suffix, 0) + 1
            continue
        uris.append(uri)
        sources.append(rel)
        sizes.append(size)
        modified.append(mtime)
        etags.append(etag)
        formats.append(detected[0])
        compressions.append(detected[1])
    return _table(uris, sources, sizes, modified, etags, formats, compressions)


def _list_one(spec: str, fmt: str, pool: ThreadPoolExecutor) -> pa.Table:
    """The data files one input argument names."""
    if spec == PYTHON_STDLIB:
        root = sysconfig.get_paths()["stdlib"]
        return _typed(spec, root, _stdlib(root), "text", named=False)
    magic = [i for i, c in enumerate(spec) if c in "*?["]
    if magic:
        cut = spec.rfind("/", 0, magic[0])
        base, pattern = (spec[:cut], spec[cut + 1:]) if cut >= 0 else (".", spec)
        matcher = glob_regex(pattern)
        depth = None if "**" in pattern else pattern.count("/")
        found = _typed(spec, base, (r for r in _list_store(base, pool, depth) if matcher.fullmatch(r[0])), fmt,
                       named=False)
    else:
        kind, row = _kind(spec)
        if kind == "missing":
            raise InputError(f"input path {spec!r} does not exist")
        if row is not None:
            return _typed(spec, spec, [row], fmt, named=True)
        if fmt == "delta" or (fmt == "auto" and _is_delta(spec)):
            return _delta_files(spec)
        found = _typed(spec, spec, _list_store(spec, pool), fmt, named=False)
    if not found.num_rows:
        raise InputError(f"input {spec!r} matches no file")
    return found


def list_inputs(paths: list[str], fmt: str = "auto") -> Listing:
    """Every input file, sorted by source; unknown formats and empty inputs raise InputError.

    The input ``python-stdlib`` names the running Python's standard-library sources, one
    document per file. The same relative name under two roots: sources become full paths.
    """
    paths = [p if "://" in p or p == PYTHON_STDLIB else os.path.abspath(p) for p in paths]
    with ThreadPoolExecutor(LIST_THREADS, thread_name_prefix="bfpack-list") as pool:
        def one(spec: str) -> pa.Table:
            from botocore.exceptions import BotoCoreError, ClientError

            try:
                return _list_one(spec, fmt, pool)
            except (OSError, BotoCoreError, ClientError) as exc:  # permissions, network, credentials
                raise InputError(f"cannot list input {spec!r}: {_first_line(exc)}") from None

        # the arguments are listed by their own threads: a prefix's listing queues in the pool
        with ThreadPoolExecutor(min(LIST_THREADS, max(1, len(paths)))) as outer:
            tables = list(outer.map(one, paths))
    table = pa.concat_tables(tables) if tables else LISTING.empty_table()
    if not table.num_rows:
        raise InputError(f"no .jsonl, .json[.gz|.zst] or .parquet file found in {', '.join(paths)}")
    table = table.take(pc.sort_indices(table, [("source", "ascending")]))
    sources = table.column("source")
    if len(sources) > 1 and pc.any(pc.equal(sources.slice(1), sources.slice(0, len(sources) - 1))).as_py():
        table = table.set_column(1, "source", table.column("uri"))  # sorted by uri: the same order per root
        table = table.take(pc.sort_indices(table, [("source", "ascending")]))
    return Listing(table)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def content_digest(uri: str, size: int, edge: int = 2**16) -> str:
    """A digest of a file's first and last ``edge`` bytes, as bfpack before 0.2 recorded each input file;
    only computed for an incremental run over a root whose ``inputs`` rows hold no modification time."""
    h = hashlib.sha256()
    try:
        h.update(read_bytes(uri, size, 0, edge))
        if size > edge:
            h.update(read_bytes(uri, size, max(edge, size - edge), size))
    except OSError as exc:
        raise InputError(f"cannot read {uri!r}: {exc}") from None
    return h.hexdigest()[:16]
