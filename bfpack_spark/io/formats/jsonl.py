"""JSON lines (plain, gzip or zstd): one record per line, a document or a reject each.

A document's ``row`` is the byte offset of its line (after decompression). Ids: with an id column
named, a file whose first JSON object (among its first :data:`ID_LINES` lines) lacks that field gets
ids from source and row (``source:row``); in a file that has ids, a record without one is a reject.
That is decided per file, from its first record, so it cannot depend on how the file is cut: the
task reading from the file's start decides as it reads; a task reading a later byte range reads the
file's first record first (:func:`first_record`).
"""

from __future__ import annotations

import codecs
import io
import json
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from bfpack_spark.io.formats.base import (
    BATCH_BYTES,
    BATCH_DOCS,
    EXCERPT_CHARS,
    Fields,
    RawBatch,
    Reject,
    excerpt,
    too_large,
)
from bfpack_spark.io.formats.fetch import Opened
from bfpack_spark.io.formats.inflate import Corrupt, Inflated, inflate_whole

#: bytes read at a time from a plain file (a compressed stream hands out what one piece decodes to)
BLOCK_BYTES = 8 * 2**20
#: a file's id convention is decided by its first JSON object among this many lines
ID_LINES = 1000


class LineHead(bytes):
    """The first bytes of a line longer than ``max_line_bytes`` (the rest is not kept)."""


def _line(data: bytearray, too_long: bool, offset: int) -> bytes:
    line = bytes(data)
    if offset == 0 and line.startswith(codecs.BOM_UTF8):  # some tools start UTF-8 files with one
        line = line[len(codecs.BOM_UTF8):]
    return LineHead(line) if too_long else line


def _stream(opened: Opened, pos: int):
    """The file's (decompressed) bytes from ``pos`` (0 for a compressed file)."""
    split = opened.split
    if split.compression:
        decoded = None if opened.data is None else inflate_whole(opened.data, split.compression)
        return io.BytesIO(decoded) if decoded is not None else Inflated(opened.raw, split.compression)
    raw = opened.raw()
    raw.seek(pos)
    return raw


def lines(opened: Opened, max_bytes: int, block: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(offset, line) for each line whose first byte lies in the split; a :class:`LineHead` for a
    line over ``max_bytes``.

    A split that starts inside the file skips the line begun before it (reading from
    one byte early tells whether its first byte starts a line); the split holding a
    line's first byte reads that line to its end, past the split's end if need be.
    """
    block = block or BLOCK_BYTES
    start, end = opened.split.byte_range or (0, None)
    skip = start > 0
    pos = start - 1 if skip else 0   # file offset of the next block's first byte
    try:
        stream = _stream(opened, pos)
    except Exception as exc:
        raise Corrupt(0, f"{type(exc).__name__}: {exc}") from None
    line_at, line, too_long = pos, bytearray(), False
    try:
        while True:
            try:
                data = stream.read(block)
            except Exception as exc:  # decompression errors surface as assorted types
                raise Corrupt(line_at, f"{type(exc).__name__}: {exc}") from None
            if not data:
                break
            i = 0
            while True:
                nl = data.find(b"\n", i)
                if not too_long:
                    line += data[i:] if nl < 0 else data[i:nl]
                    if len(line) > max_bytes:  # stop keeping bytes, but for an excerpt
                        del line[EXCERPT_CHARS * 4:]
                        too_long = True
                if nl < 0:
                    break
                if skip:
                    skip = False
                elif end is not None and line_at >= end:
                    return
                else:
                    yield line_at, _line(line, too_long, line_at)
                line_at, line, too_long, i = pos + nl + 1, bytearray(), False, nl + 1
            pos += len(data)
        if (line or too_long) and not skip and (end is None or line_at < end):
            yield line_at, _line(line, too_long, line_at)
    finally:
        stream.close()


BLANK = "blank line (no JSON record)"


def _parsed(raw: bytes) -> tuple[Any, str | None]:
    """A line's JSON value, or why it has none."""
    if not raw.strip():
        return None, BLANK
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"invalid UTF-8 at byte {exc.start} of the line"
    try:
        return json.loads(line), None
    except json.JSONDecodeError as exc:
        return None, f"malformed JSON: {exc.msg} (column {exc.colno})"


def first_record(opened: Opened, max_line_bytes: int = 2**30) -> dict | None:
    """The first JSON object of a JSON-lines file (within its first :data:`ID_LINES` lines); None where
    there is none before the damage of a compressed file. A plain file that cannot be read raises
    (``OSError``): a read task must not decide its file's ids without it."""
    try:
        for i, (_, raw) in enumerate(lines(opened.whole_file(), max_line_bytes, 2**16)):
            if i >= ID_LINES:
                break
            obj = None if isinstance(raw, LineHead) else _parsed(raw)[0]
            if isinstance(obj, dict):
                return obj
    except Corrupt as exc:
        if not opened.split.compression:
            raise OSError(f"cannot read {opened.split.uri}: {exc}") from None
    return None


def _json_kind(value: object) -> str:
    """What a parsed JSON value is, in JSON's words."""
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
             dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def _id_string(value: object) -> str | None:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _readable_id(raw: bytes, id_column: str) -> str | None:
    """The id of a record that is rejected for its bytes (too large, invalid UTF-8), where it can
    still be read: the record parsed with bad bytes replaced, else the id field found in the
    line's head (a too-large line is kept only in part)."""
    text = raw.decode("utf-8", errors="replace")
    try:
        obj = json.loads(text)
        return _id_string(obj.get(id_column)) if isinstance(obj, dict) else None
    except ValueError:
        pass
    name = json.dumps(id_column)  # the field name as it is written in JSON
    match = re.search(re.escape(name) + r'\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+)', text)
    if match is None:
        return None
    try:
        return _id_string(json.loads(match.group(1)))
    except ValueError:
        return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _int64_lists(lists: list[list[int]]) -> pa.Array:
    """Python integer lists as Arrow ``list<int64>``; a value beyond int64 becomes -1 (rejected later as
    out of range)."""
    try:
        return pa.array(lists, type=pa.list_(pa.int64()))
    except (pa.ArrowInvalid, OverflowError):
        return pa.array([[t if -2**63 <= t < 2**63 else -1 for t in x] for x in lists], type=pa.list_(pa.int64()))


class _Batch:
    """The documents and rejects of one batch, of one file or of consecutive small ones, as they are read."""

    def __init__(self) -> None:
        self.sources: list[str] = []
        self.rows: list[int] = []
        self.ids: list[str] = []
        self.values: list[Any] = []   # texts, or token lists
        self.extras: list[Any] = []   # prompts, or loss masks
        self.rejects: list[Reject] = []

    def finish(self, fields: Fields) -> RawBatch:
        n = len(self.rows)
        batch = RawBatch(rows=np.array(self.rows, np.int64), ids=pa.array(self.ids, pa.string()),
                         sources=pa.array(self.sources, pa.string()), rejects=self.rejects,
                         n_records=n + len(self.rejects))
        if fields.tokenized:
            batch.tokens = _int64_lists(self.values)
            if fields.extra is not None:
                batch.masks = _int64_lists(self.extras)
        else:
            batch.texts, batch.prompts = self.values, self.extras
        return batch


class Lines:
    """Documents of consecutive JSON-lines files waiting to be handed out together: a batch costs about
    the same for one document as for thousands, and a file of a few lines would pay it alone."""

    def __init__(self, fields: Fields):
        self.fields = fields
        self.batch = _Batch()
        self.nbytes = 0  # of the held documents' lines

    def full(self) -> bool:
        return len(self.batch.rows) >= BATCH_DOCS or self.nbytes >= BATCH_BYTES

    def flush(self) -> Iterator[RawBatch]:
        if self.batch.rows or self.batch.rejects:
            batch, self.batch, self.nbytes = self.batch, _Batch(), 0
            yield batch.finish(self.fields)


class _Records:
    """Turns one file's lines into documents and rejects (into ``held``'s batch); decides the file's id
    convention from its first JSON object when not told (rejects before it wait for the decision: their
    ids depend on it)."""

    def __init__(self, opened: Opened, fields: Fields, has_ids: bool | None, held: Lines):
        self.split, self.fields, self.held = opened.split, fields, held
        self.has_ids = False if fields.id_column is None else has_ids
        self.waiting: list[tuple[Reject, str | None]] = []  # rejects before the decision, with their ids
        self.seen = 0

    def decide(self, has_ids: bool) -> None:
        if self.has_ids is None:
            self.has_ids = has_ids
            for reject, doc_id in self.waiting:
                reject.doc_id = doc_id if has_ids else None
                self.held.batch.rejects.append(reject)
            self.waiting = []

    def reject(self, row: int, reason: str, raw: object, doc_id: str | None = None, readable: bool = False) -> None:
        """A reject; ``readable``: its id is read from its bytes, where the file has ids."""
        reject = Reject(self.split.source, row, reason, excerpt(raw), doc_id)
        id_column = self.fields.id_column
        if readable and id_column is not None and isinstance(raw, bytes):
            if self.has_ids is None:
                self.waiting.append((reject, _readable_id(raw, id_column)))
                return
            reject.doc_id = _readable_id(raw, id_column) if self.has_ids else None
        self.held.batch.rejects.append(reject)

    def take(self, row: int, raw: bytes) -> None:
        self.seen += 1
        self.held.nbytes += len(raw)
        if self.seen > ID_LINES:
            self.decide(False)
        limits = self.fields.limits
        if isinstance(raw, LineHead):
            self.reject(row, f"line larger than max_line_bytes ({limits.line_bytes:,} bytes)", raw, readable=True)
            return
        obj, problem = _parsed(raw)
        if problem is not None:
            self.reject(row, problem, raw, readable=problem != BLANK)
            return
        if not isinstance(obj, dict):
            self.reject(row, f"not a JSON object but {_json_kind(obj)}", raw)
            return
        self.decide(self.fields.id_column in obj)
        doc_id = self._doc_id(row, raw, obj)
        if doc_id is not None:
            self._document(row, raw, obj, doc_id)

    def _doc_id(self, row: int, raw: bytes, obj: dict) -> str | None:
        id_column = self.fields.id_column
        if not self.has_ids or id_column is None:
            return f"{self.split.source}:{row}"
        doc_id = _id_string(obj.get(id_column))
        if doc_id is None:
            value = obj.get(id_column)
            what = "missing" if value is None or value == "" else _json_kind(value)
            self.reject(row, f"id field {id_column!r} is {what}", raw)
        elif not _encodes(doc_id):
            self.reject(row, f"id field {id_column!r} holds an unpaired surrogate escape (invalid Unicode)", raw)
            return None
        return doc_id

    def _document(self, row: int, raw: bytes, obj: dict, doc_id: str) -> None:
        f, b = self.fields, self.held.batch
        value = obj.get(f.column)
        if value is None:
            self.reject(row, f"{f.kind} field {f.column!r} is {'null' if f.column in obj else 'missing'}", raw, doc_id)
            return
        side = None
        if f.extra is not None:
            side, problem = _json_extra(obj, f)
            if problem:
                self.reject(row, problem, raw, doc_id)
                return
        if f.tokenized:
            if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
                self.reject(row, f"{f.kind} field {f.column!r} is not a list of integers", raw, doc_id)
                return
        elif not isinstance(value, str):
            self.reject(row, f"{f.kind} field {f.column!r} is {_json_kind(value)}, not a string", raw, doc_id)
            return
        else:
            try:
                size = len(value.encode("utf-8")) + (len(side.encode("utf-8")) if side is not None else 0)
            except UnicodeEncodeError:
                what = "text" if side is None or _encodes(value) else "prompt"
                self.reject(row, f"{what} holds an unpaired surrogate escape (invalid Unicode)", raw, doc_id)
                return
            if size > f.limits.document_bytes:
                self.reject(row, too_large(f.limits.document_bytes), raw, doc_id)
                return
        b.sources.append(self.split.source)
        b.rows.append(row)
        b.ids.append(doc_id)
        b.values.append(value)
        if side is not None:
            b.extras.append(side)


def _json_extra(obj: dict, fields: Fields) -> tuple[Any, str | None]:
    """The extra field of a JSON record (a loss mask or a prompt) and, when it is wrong, why."""
    name, what = fields.extra, fields.extra_kind
    value = obj.get(name)
    if value is None:
        return None, f"{what} field {name!r} is {'null' if name in obj else 'missing'}"
    if fields.tokenized:
        if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
            return None, f"{what} field {name!r} is not a list of 0/1 (integers or booleans)"
        return [int(v) for v in value], None
    if not isinstance(value, str):
        return None, f"{what} field {name!r} is {_json_kind(value)}, not a string"
    return value, None


def read_jsonl(opened: Opened, fields: Fields, has_ids: bool | None = None,
               held: Lines | None = None) -> Iterator[RawBatch]:
    """Batches of the documents and rejects of one split of a JSON-lines file, in file order.
    ``has_ids``: the file's id convention, when known (None: decided from its first record); ``held``:
    where its last documents wait to be handed out with the next file's (the caller flushes it)."""
    mine = held is None
    held = held or Lines(fields)
    records = _Records(opened, fields, has_ids, held)
    try:
        for row, raw in lines(opened, fields.limits.line_bytes):
            records.take(row, raw)
            if held.full():
                yield from held.flush()
    except Corrupt as exc:
        compression = opened.split.compression or ""
        records.decide(False)
        records.reject(exc.offset, f"corrupt or truncated {compression} file; reading stopped here "
                                   f"({exc})".replace("  ", " "), "")
    if records.has_ids is None and opened.split.byte_range is not None:  # the file's first object lies further
        first = first_record(opened, fields.limits.line_bytes)
        records.decide(first is not None and fields.id_column in first)
    records.decide(False)
    if mine:
        yield from held.flush()
