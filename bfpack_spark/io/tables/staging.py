"""Table files written by the tasks that produce their rows, and the descriptions the commit needs.

A task writes its rows as one Parquet file through ``pyarrow.fs`` under the run's
folder of the table (``<table>/<run id>/``) and returns a
:class:`StagedFile`: path, size, rows, Delta's per-file statistics, and the figures the
audit adds up. The driver commits exactly the files whose descriptions reached it, which
only successful task attempts return: a failed or speculative attempt's file is never
in the log, and is removed as an orphan.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bfpack_spark.io.store.fs import filesystem, join, make_dirs
from bfpack_spark.stats.figures import add_figures

#: Columns whose values repeat (dictionary encoding pays); token ids and ids do not.
_DICTIONARY_COLUMNS = {"run_id", "source", "reason"}
#: Row groups of about this many bytes (in memory): large enough to scan fast, small enough
#: for a reader to hold one.
ROW_GROUP_BYTES = 64 * 2**20


@dataclass(frozen=True)
class StagedFile:
    """One written data file of one table, as the commit and the audit see it."""

    table: str
    path: str                      # relative to the table root
    size: int
    rows: int
    stats: str                     # Delta ``stats`` JSON: numRecords, minValues, maxValues, nullCount
    figures: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> StagedFile:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Staging:
    """Where the tasks of a run write table files: ``<root>/<table>/<folder>/`` (the run's folder, the same
    for every attempt of the run, so that a resumed attempt commits what an earlier one wrote)."""

    root: str
    folder: str
    run_id: str

    def table_uri(self, table: str) -> str:
        return join(self.root, table)

    def writer(self, table: str, name: str, schema: pa.Schema,
               figures: Callable[[pa.Table], dict] | None = None) -> TableWriter:
        """A file of ``table`` written part by part (see :class:`TableWriter`)."""
        return TableWriter(self.table_uri(table), self.folder, name, schema, figures)

    def holds(self, file: StagedFile) -> bool:
        """Whether ``file`` (staged by an earlier attempt of this run) is there as its writer described it:
        its footer's rows (and, for sequences, token values) are the writer's. What a resumed run checks
        before it reuses a file."""
        try:
            rows, tokens = footer_figures(join(self.table_uri(file.table), file.path), file.table)
        except (OSError, pa.ArrowException):
            return False
        return rows == file.rows and (file.table != "sequences" or tokens == file.figures.get("tokens"))

    def write(self, table: str, name: str, data: pa.Table, figures: dict | None = None) -> StagedFile:
        """A file of ``table`` holding ``data``, written at once."""
        with self.writer(table, name, data.schema, (lambda _: figures or {})) as out:
            out.write(data)
        if out.staged is None:
            raise ValueError(f"no rows to write to {table}/{name}")
        return out.staged


def _json_value(v):
    if isinstance(v, (datetime, date)):
        return v.isoformat()
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v


def delta_stats(meta: pq.FileMetaData) -> str:
    """Delta ``stats`` JSON (record count, per-column min/max/null count) from a Parquet footer."""
    mins: dict = {}
    maxs: dict = {}
    nulls: dict = {}
    for rg in range(meta.num_row_groups):
        group = meta.row_group(rg)
        for c in range(group.num_columns):
            col = group.column(c)
            name = col.path_in_schema
            if "." in name:  # nested (list, map) columns: no statistics in Delta
                continue
            st = col.statistics
            if st is None or not st.has_min_max:
                nulls[name] = nulls.get(name, 0) + (st.null_count if st is not None else 0)
                continue
            lo, hi = _json_value(st.min), _json_value(st.max)
            mins[name] = lo if name not in mins else min(mins[name], lo)
            maxs[name] = hi if name not in maxs else max(maxs[name], hi)
            nulls[name] = nulls.get(name, 0) + st.null_count
    return json.dumps({"numRecords": meta.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls})


class TableWriter:
    """One Parquet file ``<table_uri>/<folder>/<name>-<random>.parquet``, written part by part as
    a task builds its rows, so the task never holds a whole file; ``staged`` describes it once
    closed (None when nothing was written: no empty files). The random suffix keeps two attempts
    of one task from writing the same file; ``figures`` computes each part's audit figures."""

    def __init__(self, table_uri: str, folder: str, name: str, schema: pa.Schema,
                 figures: Callable[[pa.Table], dict] | None = None):
        self.table_uri, self.schema, self.figures = table_uri, schema, figures
        self.rel = f"{folder}/{name}-{uuid.uuid4().hex[:8]}.parquet"
        self.rows, self.totals = 0, list[dict]()
        self.staged: StagedFile | None = None
        self._writer: Any = None  # a pq.ParquetWriter once the first part arrives
        self._out: Any = None
        self._collected: list[pq.FileMetaData] = []

    def write(self, part: pa.Table) -> None:
        if part.num_rows == 0:
            return
        if self._writer is None:
            fs, self._path = filesystem(join(self.table_uri, self.rel))
            make_dirs(fs, posixpath.dirname(self._path.replace("\\", "/")))
            self._fs, self._out = fs, fs.open_output_stream(self._path)
            self._writer = pq.ParquetWriter(
                self._out, self.schema, compression="zstd",
                use_dictionary=[c for c in self.schema.names if c in _DICTIONARY_COLUMNS],
                # as Delta: no nested columns (nor timestamps, whose statistics' text form readers disagree on)
                write_statistics=[f.name for f in self.schema
                                  if not pa.types.is_nested(f.type) and not pa.types.is_timestamp(f.type)],
                metadata_collector=self._collected)
        self._writer.write_table(part, row_group_size=max(1024, ROW_GROUP_BYTES * part.num_rows
                                                          // max(1, part.nbytes)))
        self.rows += part.num_rows
        if self.figures is not None:
            self.totals.append(self.figures(part))

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._out.close()
        if exc_type is None:
            self.staged = StagedFile(table=_table_name(self.table_uri), path=self.rel,
                                     size=self._fs.get_file_info(self._path).size, rows=self.rows,
                                     stats=delta_stats(self._collected[0]), figures=add_figures(self.totals))


def _table_name(table_uri: str) -> str:
    return posixpath.basename(table_uri.rstrip("/").replace("\\", "/"))


def footer_figures(uri: str, table: str) -> tuple[int, int]:
    """(rows, token values) from one file's Parquet footer; token values only for sequences."""
    fs, path = filesystem(uri)
    with fs.open_input_file(path) as fh:
        meta = pq.read_metadata(fh)
    tokens = 0
    if table == "sequences":
        for rg in range(meta.num_row_groups):
            group = meta.row_group(rg)
            for c in range(group.num_columns):
                if group.column(c).path_in_schema.startswith("input_ids."):
                    tokens += group.column(c).num_values
    return meta.num_rows, tokens
