"""Finding the input files and cutting them into groups, one Spark task each.

Groups are defined by the files' content and the config alone: files are sorted by
their name relative to the input root, cut into splits (Parquet row groups, byte
ranges of uncompressed JSON lines, whole compressed files), and consecutive splits
are gathered into groups of about ``target_items_per_partition`` items. So the same
input gives the same groups whatever the machine, the number of cores, or the
order in which the files were listed.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import logging
import os
import posixpath
import re
import sysconfig
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bfpack_spark.io.files import (
    InputError,
    InputFile,
    Split,
    delta_storage_options,
    detect_format,
    filesystem,
    join,
)
from bfpack_spark.io.readers import first_record

log = logging.getLogger(__name__)

PYTHON_STDLIB = "python-stdlib"
#: Rough sizes used to size groups before anything is tokenized.
BYTES_PER_TOKEN = 4
COMPRESSION_RATIO = {"gzip": 3, "zstd": 4}


@dataclass
class InputPlan:
    files: list[InputFile]
    groups: list[list[Split]] = field(default_factory=list)
    #: digests already computed (by an incremental run's selection), by uri
    digests: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    #: re-packed files: uri -> the earlier run whose rows this run replaces
    replaces: dict[str, str] = field(default_factory=dict)

    def listing(self) -> list[tuple[str, int, str]]:
        """(name, size, digest of the first and last 64 KiB) of every input file (computed once)."""
        for f in self.files:
            if f.uri not in self.digests:
                self.digests[f.uri] = content_digest(f)
        return [(f.source, f.size, self.digests[f.uri]) for f in self.files]


def content_digest(f: InputFile, edge: int = 2**16) -> str:
    """A digest of a file's first and last ``edge`` bytes: cheap, and it changes when content does
    (compressed files and Parquet footers summarize their whole content at the end)."""
    fs, path = filesystem(f.uri)
    h = hashlib.sha256()
    try:
        with fs.open_input_file(path) as fh:
            h.update(fh.read(edge))
            if f.size > edge:
                fh.seek(max(edge, f.size - edge))
                h.update(fh.read(edge))
    except OSError as exc:
        raise InputError(f"cannot read {f.uri!r}: {exc}") from None
    return h.hexdigest()[:16]


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.replace("\\", "/").split("/"))


def _list_dir(fs: pafs.FileSystem, path: str) -> list[tuple[str, int]]:
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    out = []
    for info in infos:
        if info.type == pafs.FileType.File:
            rel = posixpath.relpath(info.path.replace("\\", "/"), path.replace("\\", "/"))
            if not _hidden(rel):
                out.append((rel, info.size))
    return out


def _is_delta(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(posixpath.join(path, "_delta_log")).type == pafs.FileType.Directory


def _delta_files(uri: str) -> list[InputFile]:
    from deltalake import DeltaTable

    try:
        table = DeltaTable(uri, storage_options=delta_storage_options())
    except Exception as exc:
        raise InputError(f"cannot open Delta table {uri!r}: {exc}") from None
    features = set(table.protocol().reader_features or [])
    unsupported = features & {"deletionVectors", "columnMapping"}
    if unsupported:
        raise InputError(
            f"Delta table {uri!r} uses {', '.join(sorted(unsupported))}, which bfpack does not read; "
            f"rewrite it without them (e.g. REORG TABLE ... APPLY (PURGE)) or export it to Parquet"
        )
    adds = pa.table(table.get_add_actions(flatten=True)).to_pydict()
    name = posixpath.basename(uri.rstrip("/"))
    return [
        InputFile(uri=join(uri, path), source=f"{name}/{path}", size=int(size), format="parquet")
        for path, size in sorted(zip(adds["path"], adds["size_bytes"]))
    ]


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


def _expand(spec: str) -> list[tuple[str, str, int]]:
    """(uri, source, size) for every data file that one input argument names."""
    magic = any(c in spec for c in "*?[")
    if magic:
        if "://" in spec:
            scheme_root = spec[: spec.index("://") + 3]
            rest = spec[len(scheme_root):]
            prefix = rest[: min(rest.index(c) for c in "*?[" if c in rest)].rsplit("/", 1)[0]
            fs, base = filesystem(scheme_root + prefix)
            pattern = rest[len(prefix) + 1:]
            matcher = glob_regex(pattern)
            return [(join(scheme_root + prefix, rel), rel, size) for rel, size in _list_dir(fs, base)
                    if matcher.fullmatch(rel)]
        root = spec[: min(spec.index(c) for c in "*?[" if c in spec)]
        root = root if root.endswith(os.sep) else os.path.dirname(root)
        out = []
        for path in globlib.glob(spec, recursive=True):
            if os.path.isfile(path):
                out.append((path, os.path.relpath(path, root or "."), os.path.getsize(path)))
        return out
    fs, path = filesystem(spec)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input path {spec!r} does not exist")
    if info.type == pafs.FileType.File:
        return [(spec, posixpath.basename(path.replace("\\", "/")), info.size)]
    return [(join(spec, rel), rel, size) for rel, size in _list_dir(fs, path)]


def python_stdlib_files() -> list[InputFile]:
    """The running Python's standard-library sources: a real, long-tailed code corpus on every machine."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for name in filenames:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                files.append(InputFile(path, os.path.relpath(path, root), os.path.getsize(path), "text"))
    return files


def check_output(root: str) -> None:
    """Fail early, with one line, when the output root cannot be written."""
    if "://" in root and not root.startswith("file://"):
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


def list_inputs(paths: Iterable[str], fmt: str = "auto") -> list[InputFile]:
    """Every input file, sorted by source name; unknown formats and empty inputs raise InputError.

    The input ``python-stdlib`` names the running Python's standard-library sources,
    one document per file.
    """
    files: list[InputFile] = []
    for spec in paths:
        if spec == PYTHON_STDLIB:
            files.extend(python_stdlib_files())
            continue
        try:
            files.extend(_list_one(spec, fmt))
        except OSError as exc:  # permissions, network, credentials
            raise InputError(f"cannot list input {spec!r}: {exc}") from None
    if not files:
        raise InputError(f"no .jsonl, .json[.gz|.zst] or .parquet file found in {', '.join(paths)}")
    # a local file is the same file however its path was typed (and wherever an executor runs)
    files = [f if "://" in f.uri else replace(f, uri=os.path.abspath(f.uri)) for f in files]
    sources = [f.source for f in files]
    if len(set(sources)) != len(sources):  # the same relative name under two roots: use full paths
        files = [InputFile(f.uri, f.uri, f.size, f.format, f.compression) for f in files]
    return sorted(files, key=lambda f: f.source)


def _list_one(spec: str, fmt: str) -> list[InputFile]:
    """The data files one input argument names."""
    magic = any(c in spec for c in "*?[")
    is_dir = False
    if not magic:
        fs, path = filesystem(spec)
        is_dir = fs.get_file_info(path).type == pafs.FileType.Directory
        if fmt == "delta" or (fmt == "auto" and is_dir and _is_delta(fs, path)):
            return _delta_files(spec)
    found = _expand(spec)
    if not found:
        raise InputError(f"input {spec!r} matches no file")
    files = []
    for uri, source, size in found:
        detected = detect_format(uri)
        if fmt == "text":
            files.append(InputFile(uri, source, size, "text"))
        elif fmt in ("jsonl", "parquet"):
            files.append(InputFile(uri, source, size, fmt, detected[1] if detected else None))
        elif detected is not None:
            files.append(InputFile(uri, source, size, *detected))
        elif not (magic or is_dir):
            raise InputError(f"cannot tell the format of {spec!r} from its name; set --input-format")
        # else: a directory or glob may hold other files (READMEs, _SUCCESS, ...)
    return files


def _missing_payload(payload: str, tokenized: bool, where: str) -> InputError:
    flag = "--token-column" if tokenized else "--text-column"
    return InputError(f"{flag} {payload!r} is not {where}")


def _parquet_splits(f: InputFile, payload: str, tokenized: bool, seq_len: int,
                    target: int) -> list[Split]:
    fs, path = filesystem(f.uri)
    try:
        with fs.open_input_file(path) as fh:
            meta = pq.ParquetFile(fh).metadata
    except (OSError, pa.ArrowException) as exc:  # damaged: its reader makes it a reject
        log.warning("cannot read the Parquet footer of %s (%s); it will be a reject", f.uri, exc)
        return [Split(f.uri, f.source, "parquet", row_groups=None)]
    names = meta.schema.to_arrow_schema().names
    if payload not in names:
        raise _missing_payload(payload, tokenized, f"a column of {f.uri} (columns: {', '.join(names)})")
    splits: list[Split] = []
    current: list[int] = []
    first_row = row = 0
    est = 0
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        size = sum(rg.column(c).total_uncompressed_size for c in range(rg.num_columns)
                   if rg.column(c).path_in_schema.split(".")[0] == payload)
        tokens = size // 4 if tokenized else size // BYTES_PER_TOKEN
        if not current:
            first_row = row
        current.append(i)
        est += rg.num_rows + tokens // seq_len
        row += rg.num_rows
        if est >= target:
            splits.append(Split(f.uri, f.source, "parquet", row_groups=tuple(current),
                                first_row=first_row, est_items=est))
            current, est = [], 0
    if current or not splits:
        splits.append(Split(f.uri, f.source, "parquet", row_groups=tuple(current),
                            first_row=first_row, est_items=max(est, 1)))
    return splits


def _jsonl_splits(f: InputFile, seq_len: int, target: int, payload: str, tokenized: bool,
                  id_column: str | None) -> list[Split]:
    """Byte ranges of a plain file (whole compressed files), with the file's id convention.

    Whether ids come from ``id_column`` or from file and row is decided once per file,
    from its first record, so it cannot depend on how the file is cut.
    """
    first = first_record(Split(f.uri, f.source, "jsonl", f.compression))
    if first is not None and payload not in first:
        raise _missing_payload(payload, tokenized, f"a field of the first record of {f.uri} "
                                                   f"(fields: {', '.join(sorted(first))})")
    has_ids = bool(id_column) and first is not None and id_column in first
    ratio = COMPRESSION_RATIO.get(f.compression or "", 1)
    # a document is at least one item; assume ~1 KB of text per document
    est = max(1, f.size * ratio // 1024 + f.size * ratio // (BYTES_PER_TOKEN * seq_len))
    if f.compression or est <= target:
        return [Split(f.uri, f.source, "jsonl", f.compression, has_ids=has_ids, est_items=est)]
    n = -(-est // target)
    step = -(-f.size // n)
    return [Split(f.uri, f.source, "jsonl", None, byte_range=(s, min(s + step, f.size)), has_ids=has_ids,
                  est_items=est // n) for s in range(0, f.size, step)]


def _columns(f: InputFile) -> list[str]:
    """The columns of a Parquet file (its footer) or the fields of a JSON-lines file's first record."""
    if f.format == "parquet":
        fs, path = filesystem(f.uri)
        try:
            with fs.open_input_file(path) as fh:
                return pq.ParquetFile(fh).schema_arrow.names
        except (OSError, pa.ArrowException):
            return []
    if f.format == "jsonl":
        return sorted(first_record(Split(f.uri, f.source, "jsonl", f.compression)) or {})
    return []


def check_named_column(files: list[InputFile], column: str, flag: str, way_out: str) -> None:
    """A column named explicitly must be in some input file (a typo would silently give every
    document a file:row id, or no loss mask); the error lists the columns the first file has."""
    first = _columns(files[0])
    if column in first or any(column in _columns(f) for f in files[1:]):
        return
    raise InputError(f"{flag} {column!r} is in no input file (columns of {files[0].source}: "
                     f"{', '.join(first) or 'none'}); name an existing column, or {way_out}")


def plan_inputs(paths: list[str], fmt: str, payload: str, tokenized: bool, seq_len: int,
                target_items: int, min_groups: int = 1, id_column: str | None = None,
                select: Callable[[list[InputFile]], list[InputFile]] | None = None,
                id_required: bool = False, extra_column: str | None = None) -> InputPlan:
    """List, split and group the input; ``payload`` is the text or token column Parquet must have.

    Groups hold about ``target_items`` items each, and there are at least
    ``min_groups`` of them where the files can be cut that finely. ``select`` keeps some of
    the listed files (an incremental run: the new ones). ``id_required``: the id column was
    named explicitly, so some file must have it; so must ``extra_column`` (a loss mask or a prompt).
    """
    files = list_inputs(paths, fmt)
    columnar = any(f.format in ("parquet", "jsonl") for f in files)
    if id_required and id_column and columnar:
        check_named_column(files, id_column, "--id-column", "drop the flag for file:row ids")
    if extra_column and columnar:
        flag = "--loss-mask-column" if tokenized else "--prompt-column"
        check_named_column(files, extra_column, flag, f"drop {flag}")
    if select is not None:
        files = select(files)
        if not files:
            return InputPlan(files=[])
    splits = _splits(files, payload, tokenized, seq_len, target_items, id_column)
    total = sum(s.est_items for s in splits)
    if total < target_items * min_groups:
        target_items = max(1, -(-total // min_groups))
        splits = _splits(files, payload, tokenized, seq_len, target_items, id_column)
    groups: list[list[Split]] = []
    est = 0
    for split in splits:
        if not groups or est >= target_items:
            groups.append([])
            est = 0
        groups[-1].append(split)
        est += split.est_items
    return InputPlan(files=files, groups=groups)


def _splits(files: list[InputFile], payload: str, tokenized: bool, seq_len: int, target: int,
            id_column: str | None) -> list[Split]:
    splits: list[Split] = []
    for f in files:
        if f.format == "parquet":
            splits.extend(_parquet_splits(f, payload, tokenized, seq_len, target))
        elif f.format == "text":
            splits.append(Split(f.uri, f.source, "text", est_items=1 + f.size // (BYTES_PER_TOKEN * seq_len)))
        else:
            splits.extend(_jsonl_splits(f, seq_len, target, payload, tokenized, id_column))
    return splits
