"""Parquet: one record per row, read row group by row group, so damage in one costs only its rows.

A document's ``row`` is its row index in the file. A large file is cut into byte ranges by the
driver, at row groups (it read the footer); the task of a range reads the file's footer and takes
the row groups whose middle byte lies in its range (:func:`row_groups_in`), so every row group is
read once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bfpack_spark.io.formats.base import BATCH_DOCS, EXCERPT_CHARS, Fields, RawBatch, Reject, excerpt, too_large
from bfpack_spark.io.formats.fetch import Opened


def row_group_start(rg: pq.RowGroupMetaData) -> int:
    """The first byte of a row group (of its first column chunk's first page)."""
    columns = [rg.column(c) for c in range(rg.num_columns)]
    return min((c.dictionary_page_offset if c.has_dictionary_page and c.dictionary_page_offset
                else c.data_page_offset) for c in columns) if columns else 0


def row_groups_in(meta: pq.FileMetaData, byte_range: tuple[int, int] | None) -> list[tuple[int, int]]:
    """(row group, index of its first row) of every row group whose middle byte lies in ``byte_range``
    (all of them for None)."""
    out, first = [], 0
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        # a whole file computes no byte offsets: a small one pays only its row counts
        if byte_range is None or byte_range[0] <= _middle_byte(rg) < byte_range[1]:
            out.append((g, first))
        first += rg.num_rows
    return out


def _middle_byte(rg: pq.RowGroupMetaData) -> int:
    return row_group_start(rg) + sum(rg.column(c).total_compressed_size for c in range(rg.num_columns)) // 2


def columns_of(opened: Opened) -> list[str] | None:
    """The columns of a Parquet file (from its footer), or None when it cannot be read."""
    try:
        with opened.random_access() as fh:
            return pq.ParquetFile(fh).schema_arrow.names
    except (OSError, pa.ArrowException):
        return None


#: at most about this many bytes of consecutive files' rows are held to be checked together (far below
#: the 2 GiB of a string column Arrow keeps in one piece)
HELD_BYTES = 64 * 2**20


class Rows:
    """Record batches of consecutive Parquet files (of one schema) waiting to be checked together: the
    checks of a batch cost about the same for one row as for thousands, and a file of a few rows would
    pay them alone."""

    def __init__(self, fields: Fields):
        self.fields = fields
        self.held: list[tuple[str, int, pa.RecordBatch]] = []  # (source, first row, rows)
        self.key: tuple | None = None  # the held batches' schema and id column
        self.n = self.nbytes = 0

    def add(self, source: str, first_row: int, rb: pa.RecordBatch, id_column: str | None) -> Iterator[RawBatch]:
        if not rb.num_rows:
            return
        if self.held and self.key != (rb.schema, id_column):
            yield from self.flush()
        self.key = (rb.schema, id_column)
        self.held.append((source, first_row, rb))
        self.n += rb.num_rows
        self.nbytes += rb.get_total_buffer_size()  # what nbytes says for an unsliced batch, without its walk
        if self.n >= BATCH_DOCS or self.nbytes >= HELD_BYTES:
            yield from self.flush()

    def flush(self) -> Iterator[RawBatch]:
        if self.held and self.key is not None:
            yield _batch(self.held, self.fields, self.key[1])
        self.held, self.key, self.n, self.nbytes = [], None, 0, 0


def read_parquet(opened: Opened, fields: Fields, rows: Rows | None = None) -> Iterator[RawBatch]:
    """Batches of the documents and rejects of one split of a Parquet file, in file order; ``rows``:
    where its documents wait to be checked with the next file's (the caller flushes it)."""
    mine = rows is None
    rows = rows or Rows(fields)
    yield from _read(opened, fields, rows)
    if mine:
        yield from rows.flush()


def _read(opened: Opened, fields: Fields, rows: Rows) -> Iterator[RawBatch]:
    split = opened.split
    first_piece = split.byte_range is None or split.byte_range[0] == 0
    try:
        fh = opened.random_access()
    except Exception as exc:
        if not first_piece:  # the driver read its footer to cut it: the file changed, or the store failed
            raise
        yield RawBatch(rejects=[Reject(split.source, 0, f"unreadable Parquet file: {exc}")], n_records=1)
        return
    with fh:
        try:
            # a file read whole is in memory: nothing to gather ahead (pre-buffering costs a small file ~15%)
            pf = pq.ParquetFile(fh, **({"pre_buffer": False} if opened.data is not None else {}))
        except (OSError, pa.ArrowException) as exc:
            if not first_piece:
                raise
            reason = f"unreadable Parquet file (damaged or truncated footer): {exc}"
            yield RawBatch(rejects=[Reject(split.source, 0, reason)], n_records=1)
            return
        names = pf.schema_arrow.names
        id_column = fields.id_column if fields.id_column in names else None
        columns = [c for c in (fields.column, id_column, fields.extra) if c is not None and c in names]
        missing = None if fields.column in names else f"{fields.kind} column {fields.column!r} is missing in this file"
        if fields.extra is not None and fields.extra not in names and not missing:
            missing = f"{fields.extra_kind} column {fields.extra!r} is missing in this file"
        for g, row in row_groups_in(pf.metadata, split.byte_range):
            group_end = row + pf.metadata.row_group(g).num_rows
            problem = missing
            if not missing:
                # one thread: a task has one core, and for a small file the pool costs more than the read
                batches = pf.iter_batches(batch_size=BATCH_DOCS, row_groups=[g], columns=columns, use_threads=False)
                while row < group_end:
                    try:
                        rb = next(batches)
                    except (OSError, pa.ArrowException, StopIteration) as exc:
                        problem = (f"unreadable Parquet data in row group {g} (rows {row}-{group_end - 1}): "
                                   f"{exc or 'the file holds fewer rows than its footer says'}")
                        break
                    yield from rows.add(split.source, row, rb, id_column)
                    row += rb.num_rows
            if problem:  # every row not read is a reject
                yield RawBatch(rejects=[Reject(split.source, r, problem) for r in range(row, group_end)],
                               n_records=group_end - row)


def _utf8_texts(values: pa.Array, n: int, what: str, bad: Callable[[np.ndarray, str], None]) -> list[str | None]:
    """A string column as Python strings; a value that is not valid UTF-8 is marked bad (None)."""
    try:
        return values.to_pylist()
    except UnicodeDecodeError:
        texts: list[str | None] = []
        for i, b in enumerate(values.cast(pa.binary()).to_pylist()):
            try:
                texts.append(None if b is None else b.decode("utf-8"))
            except UnicodeDecodeError as exc:
                one = np.zeros(n, bool)
                one[i] = True
                bad(one, f"invalid UTF-8 at byte {exc.start} of the {what}")
                texts.append(None)
        return texts


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_int_list(t: pa.DataType, booleans: bool = False) -> bool:
    return ((pa.types.is_list(t) or pa.types.is_large_list(t))
            and (pa.types.is_integer(t.value_type) or (booleans and pa.types.is_boolean(t.value_type))))


def _with_null_element(values: pa.Array, n: int) -> np.ndarray:
    """The rows of a list column holding a null element."""
    mask = np.zeros(n, bool)
    if pc.list_flatten(values).null_count:
        flat_nulls = pc.is_null(pc.list_flatten(values)).to_numpy(zero_copy_only=False)
        mask[pc.list_parent_indices(values).to_numpy()[flat_nulls]] = True
    return mask


class _Checked:
    """The rows of one record batch still kept, and why each of the others is not."""

    def __init__(self, n: int):
        self.n, self.ok, self.reasons = n, np.ones(n, dtype=bool), dict[int, str]()

    def bad(self, mask: np.ndarray, reason: str) -> None:
        for i in np.flatnonzero(mask & self.ok):
            self.reasons[int(i)] = reason
        self.ok[mask] = False

    def all_bad(self, reason: str) -> None:
        self.bad(np.ones(self.n, bool), reason)


def _ids(rb: pa.RecordBatch, rows: np.ndarray, sources: pa.Array, id_column: str | None,
         check: _Checked) -> pa.Array:
    if id_column is None:
        return pc.binary_join_element_wise(sources, pa.array(rows).cast(pa.string()), ":")
    ids = rb.column(id_column)
    if not (_is_string(ids.type) or pa.types.is_integer(ids.type)):
        check.all_bad(f"id column {id_column!r} has type {ids.type}, not string or integer")
        return pa.nulls(check.n, pa.string())
    ids = ids.cast(pa.string())
    try:
        ids.validate(full=True)
    except pa.ArrowInvalid:  # bytes that are not UTF-8: those rows are rejects, their ids null
        ids = pa.array(_utf8_texts(ids, check.n, f"id column {id_column!r}", check.bad), pa.string())
    check.bad(np.asarray(pc.fill_null(pc.equal(ids, ""), True)), f"id column {id_column!r} is null or empty")
    return ids


def _check_side(side: pa.Array, fields: Fields, check: _Checked) -> None:
    """The extra column: a loss mask (a list of 0/1 per row) beside tokens, a prompt (a string) beside text."""
    what, name = fields.extra_kind, fields.extra
    check.bad(np.asarray(side.is_null()), f"{what} column {name!r} is null")
    if not (_is_int_list(side.type, booleans=True) if fields.tokenized else _is_string(side.type)):
        check.all_bad(f"{what} column {name!r} has type {side.type}, not "
                      f"{'a list of 0/1 (integers or booleans)' if fields.tokenized else 'string'}")
    elif fields.tokenized:
        check.bad(_with_null_element(side, check.n), f"{what} column {name!r} holds a null")


def _texts(values: pa.Array, side: pa.Array | None, fields: Fields, check: _Checked) -> tuple[list[Any], list[Any]]:
    """The texts and prompts as Python strings (None where the row is rejected)."""
    texts: list[Any] = [None] * check.n
    if not _is_string(values.type):
        check.all_bad(f"text column {fields.column!r} has type {values.type}, not string")
    else:
        sizes = pc.fill_null(pc.binary_length(values), 0).to_numpy(zero_copy_only=False)
        if side is not None and _is_string(side.type):
            sizes = sizes + pc.fill_null(pc.binary_length(side), 0).to_numpy(zero_copy_only=False)
        check.bad(sizes > fields.limits.document_bytes, too_large(fields.limits.document_bytes))
        texts = _utf8_texts(values, check.n, "text", check.bad)
    prompts = _utf8_texts(side, check.n, "prompt", check.bad) if side is not None and _is_string(side.type) else []
    return texts, prompts


def _batch(held: list[tuple[str, int, pa.RecordBatch]], fields: Fields, id_column: str | None) -> RawBatch:
    """The documents and rejects of record batches of one schema ((source, first row, rows) each)."""
    rb = held[0][2]
    if len(held) > 1:
        [rb] = pa.Table.from_batches([p[2] for p in held]).combine_chunks().to_batches()  # one: HELD_BYTES
    n = rb.num_rows
    counts = np.fromiter((p.num_rows for _, _, p in held), np.int64, len(held))
    starts = np.cumsum(counts) - counts  # each held batch's first position in rb
    firsts = np.fromiter((first for _, first, _ in held), np.int64, len(held))
    rows = np.arange(n, dtype=np.int64) + np.repeat(firsts - starts, counts)
    sources = pa.DictionaryArray.from_arrays(pa.array(np.repeat(np.arange(len(held), dtype=np.int32), counts)),
                                             pa.array([source for source, _, _ in held], pa.string())
                                             ).dictionary_decode()
    values = rb.column(fields.column)
    check = _Checked(n)
    ids = _ids(rb, rows, sources, id_column, check)
    check.bad(np.asarray(values.is_null()), f"{fields.kind} column {fields.column!r} is null")
    side = rb.column(fields.extra) if fields.extra is not None else None
    if side is not None:
        _check_side(side, fields, check)
    batch = RawBatch(n_records=n)
    if fields.tokenized:
        if not _is_int_list(values.type):
            check.all_bad(f"token column {fields.column!r} has type {values.type}, not a list of integers")
        else:
            check.bad(_with_null_element(values, n), f"token column {fields.column!r} holds a null token id")
    else:
        texts, prompts = _texts(values, side, fields, check)
    keep = np.flatnonzero(check.ok)
    batch.rows, batch.ids, batch.sources = rows[keep], ids.take(pa.array(keep)), sources.take(pa.array(keep))
    if fields.tokenized:
        if _is_int_list(values.type):
            batch.tokens = values.filter(pa.array(check.ok))
            if side is not None:
                batch.masks = side.filter(pa.array(check.ok))
    else:
        batch.texts = [texts[i] for i in keep]
        if side is not None:
            batch.prompts = [prompts[i] for i in keep]
    for i in np.flatnonzero(~check.ok):
        batch.rejects.append(Reject(sources[int(i)].as_py(), int(rows[i]), check.reasons[int(i)],
                                    _value_excerpt(values, int(i)), ids[int(i)].as_py()))
    return batch


def _value_excerpt(values: pa.Array, i: int) -> str:
    """The start of a Parquet record's text or token list (what was wrong with it), cut before
    it is turned into Python (a rejected value may be huge)."""
    value = values.slice(i, 1)
    if _is_string(value.type):
        value = pc.binary_slice(value.cast(pa.large_binary()), 0, EXCERPT_CHARS * 4)
    elif pa.types.is_list(value.type) or pa.types.is_large_list(value.type):
        value = pc.list_slice(value, 0, EXCERPT_CHARS // 4)
    head = value[0].as_py()
    return "" if head is None else excerpt(head)
