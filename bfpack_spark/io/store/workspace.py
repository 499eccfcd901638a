"""A run's scratch space: each group's documents and tokens, from the read to the assembly, and the
records of the tasks that finished (what a run that lost its driver reuses).

Reading (tokenizing) is the one expensive stage, so its tokens are kept until the plan
says where each goes. Spark's cache would carry every token through the JVM and back;
here the read task writes its group's documents as one Arrow IPC file and the task
that assembles that group opens it again (memory-mapped on a local disk). Spark only
ever carries lengths and ids, and, once, the tokens of segments that change group.

The workspace must be visible to every executor: by default it lives under the output
root (``<output>/_bfpack_work/<run id>``). A file appears whole or not at all (written
under a temporary name and renamed, or one object PUT on an object store), so a task
retried or run twice by speculation leaves the same file. A run removes its workspace when
it commits; one that stopped leaves it for its rerun (the same command: the same run id) to
resume from; the next run on the root that commits removes any other run's.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.fs as pafs

from bfpack_spark.io.store.fs import filesystem, join, make_dirs

WORK_DIR = "_bfpack_work"


def atomic_output(fs: pafs.FileSystem, path: str):
    """A stream whose file appears at ``path`` only once it is closed (see :class:`_Atomic`)."""
    return _Atomic(fs, path)


class _Atomic:
    """Write to a temporary name and rename on a local file system; an object store makes an
    object visible only when its upload completes, so there the final name is written."""

    def __init__(self, fs: pafs.FileSystem, path: str):
        self.fs, self.path = fs, path
        self.local = isinstance(fs, pafs.LocalFileSystem)
        make_dirs(fs, posixpath.dirname(path))
        self.tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}" if self.local else path

    def __enter__(self):
        self.stream = self.fs.open_output_stream(self.tmp)
        return self.stream

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stream.close()
        if exc_type is not None:
            if self.local:
                self.fs.delete_file(self.tmp)
            return
        if self.local:
            self.fs.move(self.tmp, self.path)


class Workspace:
    """The scratch directory of one run (a URI or a local path), ``<work>/<run id>``: every attempt of the
    run uses it, so a run that lost its driver finds there what its tasks finished (their records)."""

    def __init__(self, uri: str):
        self.uri = uri

    def _path(self, folder: str, name: str) -> tuple[pafs.FileSystem, str]:
        fs, base = filesystem(self.uri)
        return fs, posixpath.join(base.replace("\\", "/"), folder, name)

    @contextmanager
    def group_writer(self, group: int, schema: pa.Schema,
                     folder: str = "groups") -> Iterator[pa.ipc.RecordBatchFileWriter]:
        """A writer of one group's documents (Arrow IPC, one record batch per read batch); ``folder``
        ``fragments``: the assembly's segments of sequences made elsewhere."""
        fs, path = self._path(folder, f"{group:07d}.arrow")
        with atomic_output(fs, path) as out, pa.ipc.new_file(out, schema) as writer:
            yield writer

    def group_bytes(self, group: int, folder: str = "groups") -> int | None:
        """The size of one group's file as stored (None: there is none)."""
        fs, path = self._path(folder, f"{group:07d}.arrow")
        info = fs.get_file_info(path)
        return info.size if info.type == pafs.FileType.File else None

    def group_sizes(self, folder: str = "groups") -> dict[int, int]:
        """Every stored group's file size, from one listing (what a resuming driver checks records by)."""
        fs, path = self._path(folder, "")
        sizes = {}
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
            name = posixpath.basename(info.path)
            if info.type == pafs.FileType.File and re.fullmatch(r"\d{7}\.arrow", name):
                sizes[int(name[:7])] = info.size
        return sizes

    def read_group(self, group: int, folder: str = "groups") -> pa.Table:
        """One group's documents as written; memory-mapped (not copied) on a local disk."""
        fs, path = self._path(folder, f"{group:07d}.arrow")
        if isinstance(fs, pafs.LocalFileSystem):
            return pa.ipc.open_file(pa.memory_map(path)).read_all()
        with fs.open_input_file(path) as fh:
            return pa.ipc.open_file(fh).read_all()

    def write_record(self, stage: str, group: int, record: dict) -> None:
        """The record that a task of ``stage`` finished ``group`` (written whole or not at all, after
        everything it describes)."""
        self.write_json(f"{stage}-{group:07d}.json", record, folder="done")

    def read_record(self, stage: str, group: int) -> dict | None:
        """A task's record, or None where there is none (or it cannot be read: the task is done again)."""
        return self.read_json(f"{stage}-{group:07d}.json", folder="done")

    def read_records(self, stage: str, groups: int) -> list[dict | None]:
        """The records of groups ``0..groups-1`` of ``stage`` (None where missing), fetched a few at a time."""
        with ThreadPoolExecutor(max_workers=min(16, max(groups, 1))) as pool:
            return list(pool.map(lambda g: self.read_record(stage, g), range(groups)))

    def records(self) -> dict[str, int]:
        """How many records of each stage the workspace holds."""
        fs, base = filesystem(self.uri)
        found: dict[str, int] = {}
        for info in fs.get_file_info(pafs.FileSelector(posixpath.join(base, "done"), allow_not_found=True)):
            stage = posixpath.basename(info.path).split("-")[0]
            found[stage] = found.get(stage, 0) + 1
        return found

    def write_json(self, name: str, value: dict, folder: str = "") -> None:
        """``value`` as the JSON file ``folder/name`` (written whole or not at all)."""
        fs, path = self._path(folder, name)
        with atomic_output(fs, path) as out:
            out.write(json.dumps(value, sort_keys=True).encode())

    def read_json(self, name: str, folder: str = "") -> dict | None:
        """The JSON file ``folder/name``, or None where there is none (or it cannot be read)."""
        fs, path = self._path(folder, name)
        try:
            with fs.open_input_stream(path) as fh:
                return json.loads(fh.read())
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        fs, base = filesystem(self.uri)
        if fs.get_file_info(base).type == pafs.FileType.Directory:
            fs.delete_dir(base)


def clean_workspaces(root: str, *, keep: str, run_id: str, any_run: bool, older_than: float) -> list[str]:
    """Remove the workspaces other runs left under ``root`` (but ``keep``): this run's of bfpack before 0.2
    (one per attempt) at once; any run's (``any_run``: while holding the output root's lock, so no run is
    reading its workspace) once modified before ``older_than`` (a timestamp)."""
    fs, base = filesystem(root)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    removed = []
    for info in fs.get_file_info(pafs.FileSelector(base)):
        name = posixpath.basename(info.path)
        if info.type != pafs.FileType.Directory or name == keep:
            continue
        old = info.mtime is not None and info.mtime.timestamp() < older_than
        if re.fullmatch(re.escape(run_id) + r"-[0-9a-f]{8}", name) or (any_run and old):
            fs.delete_dir(info.path)
            removed.append(name)
    return removed


def remove_if_empty(root: str) -> None:
    """Remove the directory ``root`` when nothing is left in it (no empty ``_bfpack_work`` stays behind)."""
    fs, base = filesystem(root)
    if (fs.get_file_info(base).type == pafs.FileType.Directory
            and not fs.get_file_info(pafs.FileSelector(base))):
        fs.delete_dir(base)


def workspace_name(output: str, run_id: str) -> str:
    """The workspace of run ``run_id`` into the output root ``output``: every attempt of the run finds it,
    and a work dir shared by several output roots holds one per root."""
    root = output.rstrip("/") if "://" in output else os.path.abspath(output)
    return f"{run_id}.{hashlib.sha256(root.encode()).hexdigest()[:8]}"


def workspace_root(output: str, work_dir: str | None) -> str:
    """Where attempts keep their workspaces: ``work_dir``, or ``_bfpack_work`` under the output root."""
    return work_dir or join(output, WORK_DIR)
