"""Reading one split: documents out, and for every record that is not a document, a reject.

Readers never raise on bad data. Each bad record (malformed JSON, invalid UTF-8, a
missing or null field, a value of the wrong type, an over-large document, a corrupt
or truncated compressed file) becomes a :class:`Reject` with a reason a user can act
on; everything else becomes a document with a stable position (``row``): the row
index in a Parquet file, or the byte offset of the line in a JSON-lines file (after
decompression).

Ids: with ``id_column`` set, a Parquet file without that column, or a JSON-lines
file whose first record lacks that field, gets ids derived from source and row
(``source:row``); in a file that has ids, a record without one is rejected.
"""

from __future__ import annotations

import codecs
import json
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zstandard

from bfpack_spark.io.files import Split, detect_format, filesystem

BATCH_DOCS = 2048
BLOCK_BYTES = 8 * 2**20
COMPRESSED_BLOCK_BYTES = 2**16
EXCERPT_CHARS = 160


@dataclass
class Reject:
    source: str
    row: int
    reason: str
    excerpt: str = ""
    doc_id: str | None = None


@dataclass
class RawBatch:
    """Documents of one batch: positions, ids, and texts (str) or token lists (Arrow); with an
    extra column, each text's prompt (str) or each token list's loss mask (Arrow)."""

    rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    ids: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))
    texts: list[str] = field(default_factory=list)
    tokens: pa.Array | None = None
    prompts: list[str] = field(default_factory=list)
    masks: pa.Array | None = None
    rejects: list[Reject] = field(default_factory=list)
    n_records: int = 0  # records the reader consumed: documents, or rejects it made itself

    def __len__(self) -> int:
        return len(self.rows)

    def reject_where(self, mask: np.ndarray, reason: str | list[str]) -> None:
        """Move the documents selected by ``mask`` to the rejects, with one reason or one each."""
        if not mask.any():
            return
        bad = np.flatnonzero(mask)
        reasons = reason if isinstance(reason, list) else [reason] * bad.shape[0]
        for i, why, doc_id in zip(bad, reasons, self.ids.take(pa.array(bad)).to_pylist()):
            self.rejects.append(Reject("", int(self.rows[i]), why, "", doc_id))
        keep = ~mask
        self.rows, self.ids = self.rows[keep], self.ids.filter(pa.array(keep))
        if self.tokens is not None:
            self.tokens = self.tokens.filter(pa.array(keep))
        if self.masks is not None:
            self.masks = self.masks.filter(pa.array(keep))
        if self.texts:
            self.texts = [t for t, k in zip(self.texts, keep) if k]
        if self.prompts:
            self.prompts = [p for p, k in zip(self.prompts, keep) if k]


def excerpt(value: object) -> str:
    if isinstance(value, bytes):
        value = value[: EXCERPT_CHARS * 4].decode("utf-8", errors="replace")
    text = str(value)
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "..."


def _json_kind(value: object) -> str:
    """What a parsed JSON value is, in JSON's words."""
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
             dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


#: Each reject's stable code (for grouping), from the start of its human reason; first match wins.
REASON_CODES: list[tuple[str, str]] = [
    (r"document larger than", "too_large"), (r"line larger than", "line_too_large"),
    (r"blank line", "blank_line"), (r"invalid UTF-8", "invalid_utf8"),
    (r"malformed JSON", "invalid_json"), (r"not a JSON object", "not_object"),
    (r"id (field|column) .* is (missing|null or empty)", "missing_id"), (r"id (field|column)", "bad_id"),
    (r"(text|tokens) (field|column) .* is (null|missing)", "missing_text"),
    (r"(text|prompt) holds an unpaired surrogate", "invalid_unicode"),
    (r"loss mask (field|column)", "bad_loss_mask"), (r"prompt (field|column)", "bad_prompt"),
    (r"(text|token|tokens) (field|column)", "bad_text_type"), (r"token id .* outside the vocabulary", "bad_tokens"),
    (r"empty document", "empty"), (r"no tokens", "no_tokens"), (r"duplicate id", "duplicate_id"),
    (r"corrupt or truncated", "corrupt_file"), (r"unreadable Parquet data", "corrupt_row_group"),
    (r"unreadable", "unreadable_file"),
]


def position(source: str, row: int) -> str:
    """Where a record is, in words: a JSON line by the byte offset it starts at (in the
    decompressed stream), a Parquet record by its row number, a text file as a whole."""
    found = detect_format(source)
    if found is None:
        return "the file" if row == 0 else f"row {row}"
    return f"byte {row}" if found[0] == "jsonl" else f"row {row}"


def _too_large(max_bytes: int) -> str:
    return f"document larger than max_document_bytes ({max_bytes:,} bytes of UTF-8 text)"


def reason_code(reason: str) -> str:
    """The stable code of a reject's reason (``other`` for none listed)."""
    return next((code for pattern, code in REASON_CODES if re.match(pattern, reason)), "other")


def _id_string(value: object) -> str | None:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _readable_id(raw: bytes, id_column: str | None) -> str | None:
    """The id of a record that is rejected for its bytes (too large, invalid UTF-8), where it can
    still be read: the record parsed with bad bytes replaced, else the id field found in the
    line's head (a too-large line is kept only in part)."""
    if id_column is None:
        return None
    text = raw.decode("utf-8", errors="replace")
    try:
        obj = json.loads(text)
        return _id_string(obj.get(id_column)) if isinstance(obj, dict) else None
    except ValueError:
        pass
    field = json.dumps(id_column)  # the field name as it is written in JSON
    match = re.search(re.escape(field) + r'\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+)', text)
    if match is None:
        return None
    try:
        return _id_string(json.loads(match.group(1)))
    except ValueError:
        return None


# -- JSON lines ---------------------------------------------------------------------

class _Corrupt(Exception):
    def __init__(self, offset: int, message: str):
        super().__init__(message)
        self.offset = offset


class _Inflated:
    """``read()`` over a gzip or zstd stream, decoded incrementally: every byte that decodes
    before the damage of a corrupt or truncated file is handed out, the error comes on the next
    call. Concatenated gzip members and zstd frames are read one after the other; zero bytes
    padding the end of a gzip file (as some tools write) end it.

    A decoder that fails drops what it decoded in the failing call, which may hold whole
    valid lines (a bad checksum is only seen at the end of a frame). So the file is decoded
    again up to the failing piece and through it one byte at a time, to hand out all of that.
    """

    def __init__(self, open_raw: Callable[[], Any], codec: str):
        self.open_raw, self.codec = open_raw, codec
        self.raw = open_raw()
        self.blocks = self._decode(self.raw, COMPRESSED_BLOCK_BYTES)
        self.piece_at = 0      # compressed offset of the piece the decoder was last fed
        self.in_decoder = False
        self.handed = 0        # decoded bytes handed out
        self.error: Exception | None = None

    def _new_decoder(self):
        if self.codec == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        return zstandard.ZstdDecompressor().decompressobj()

    def _decode(self, raw, piece: int, careful_from: int | None = None) -> Iterator[bytes]:
        """Decoded blocks of the whole stream; from compressed offset ``careful_from`` on, the
        input is fed one byte at a time."""
        careful = careful_from if careful_from is not None else -1  # -1: never
        track = careful < 0
        decoder, fed, padding, ended, pos = self._new_decoder(), False, False, False, 0
        while True:
            size = piece if track or pos + piece <= careful else max(1, careful - pos)
            chunk = raw.read(size)
            if not chunk:
                if fed:
                    raise EOFError("the file ends inside a compressed block (truncated)")
                return
            if track:
                self.piece_at = pos
            pos += len(chunk)
            if padding:
                if chunk.strip(b"\0"):
                    raise ValueError("data after the zero padding that ends the file")
                continue
            while chunk:
                if self.codec == "gzip" and ended and not fed and not chunk.strip(b"\0"):
                    padding = True  # zero bytes after a complete member end the file
                    break
                self.in_decoder = track
                out = decoder.decompress(chunk)
                self.in_decoder, fed = False, True
                if out:
                    yield out
                if not decoder.eof:
                    break
                chunk, decoder, fed, ended = decoder.unused_data, self._new_decoder(), False, True

    def _salvage(self) -> bytes:
        """What decodes between the bytes handed out and the decoder's failure."""
        out, skip = bytearray(), self.handed
        raw = self.open_raw()
        try:
            for block in self._decode(raw, COMPRESSED_BLOCK_BYTES, careful_from=self.piece_at):
                out += block[skip:]
                skip = max(0, skip - len(block))
        except Exception:  # the same failure, now after every byte that could be decoded
            pass
        finally:
            raw.close()
        return bytes(out)

    def read(self, n: int = -1) -> bytes:
        """The next decoded block (of any size)."""
        if self.error is not None:
            raise self.error
        try:
            block = next(self.blocks, b"")
        except Exception as exc:
            self.error = exc
            block = self._salvage() if self.in_decoder else b""
            if not block:
                raise
        self.handed += len(block)
        return block

    def close(self) -> None:
        self.raw.close()


def _open_stream(split: Split, start: int):
    """A binary stream of the split's (decompressed) bytes, positioned at ``start``."""
    fs, path = filesystem(split.uri)
    if split.compression:
        return _Inflated(lambda: fs.open_input_stream(path, compression=None), split.compression)
    fh = fs.open_input_file(path)
    fh.seek(start)
    return fh


@dataclass(frozen=True)
class Limits:
    """Size limits of one document: its text's UTF-8 bytes (``quality.max_document_bytes``) and,
    for JSON lines, the raw line read into memory (``quality.max_line_bytes``)."""

    document_bytes: int
    line_bytes: int = 2**30


class LineHead(bytes):
    """The first bytes of a line longer than ``max_line_bytes`` (the rest is not kept)."""


def _line(data: bytearray, too_long: bool, offset: int) -> bytes:
    line = bytes(data)
    if offset == 0 and line.startswith(codecs.BOM_UTF8):  # some tools start UTF-8 files with one
        line = line[len(codecs.BOM_UTF8):]
    return LineHead(line) if too_long else line


def _lines(split: Split, max_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line) for each line whose first byte lies in the split; a :class:`LineHead` for a
    line over ``max_bytes``.

    A split that starts inside the file skips the line begun before it (reading from
    one byte early tells whether its first byte starts a line); the split holding a
    line's first byte reads that line to its end, past the split's end if need be.
    """
    start, end = split.byte_range or (0, None)
    skip = start > 0
    pos = start - 1 if skip else 0   # file offset of the next block's first byte
    try:
        stream = _open_stream(split, pos)
    except Exception as exc:
        raise _Corrupt(0, f"{type(exc).__name__}: {exc}") from None
    line_at, line, too_long = pos, bytearray(), False
    try:
        while True:
            try:
                block = stream.read(BLOCK_BYTES)  # a compressed stream hands out what one piece decodes to
            except Exception as exc:  # decompression errors surface as assorted types
                raise _Corrupt(line_at, f"{type(exc).__name__}: {exc}") from None
            if not block:
                break
            i = 0
            while True:
                nl = block.find(b"\n", i)
                if not too_long:
                    line += block[i:] if nl < 0 else block[i:nl]
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
            pos += len(block)
        if (line or too_long) and not skip and (end is None or line_at < end):
            yield line_at, _line(line, too_long, line_at)
    finally:
        stream.close()


def first_record(split: Split, max_lines: int = 1000) -> dict | None:
    """The first JSON object of a JSON-lines file (within its first ``max_lines`` lines)."""
    whole = Split(split.uri, split.source, "jsonl", split.compression)
    try:
        for i, (_, raw) in enumerate(_lines(whole, 2**26)):
            if i >= max_lines:
                break
            try:
                obj = None if isinstance(raw, LineHead) else json.loads(raw)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    except _Corrupt:
        pass
    return None


def _extra_kind(tokenized: bool) -> str:
    """What the extra column holds: a loss mask beside tokens, a prompt beside text."""
    return "loss mask" if tokenized else "prompt"


def _json_extra(obj: dict, name: str, tokenized: bool) -> tuple[Any, str | None]:
    """The extra field of a JSON record (a loss mask or a prompt) and, when it is wrong, why."""
    what = _extra_kind(tokenized)
    value = obj.get(name)
    if value is None:
        return None, f"{what} field {name!r} is {'null' if name in obj else 'missing'}"
    if tokenized:
        if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
            return None, f"{what} field {name!r} is not a list of 0/1 (integers or booleans)"
        return [int(v) for v in value], None
    if not isinstance(value, str):
        return None, f"{what} field {name!r} is {_json_kind(value)}, not a string"
    return value, None


def read_jsonl(split: Split, id_column: str | None, field_name: str, tokenized: bool,
               limits: Limits, extra: str | None = None) -> Iterator[RawBatch]:
    batch = RawBatch()
    rows: list[int] = []
    ids: list[str | None] = []
    token_lists: list[list[int]] = []
    mask_lists: list[list[int]] = []
    has_ids = split.has_ids and id_column is not None
    kind = "tokens" if tokenized else "text"

    def reject(row: int, reason: str, raw: object, doc_id: str | None = None) -> None:
        batch.rejects.append(Reject(split.source, row, reason, excerpt(raw), doc_id))

    try:
        for row, raw in _lines(split, limits.line_bytes):
            if isinstance(raw, LineHead):
                reject(row, f"line larger than max_line_bytes ({limits.line_bytes:,} bytes)", raw,
                       _readable_id(raw, id_column) if has_ids else None)
                continue
            if not raw.strip():
                reject(row, "blank line (no JSON record)", raw)
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                reject(row, f"invalid UTF-8 at byte {exc.start} of the line", raw,
                       _readable_id(raw, id_column) if has_ids else None)
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                reject(row, f"malformed JSON: {exc.msg} (column {exc.colno})", raw,
                       _readable_id(raw, id_column) if has_ids else None)
                continue
            if not isinstance(obj, dict):
                reject(row, f"not a JSON object but {_json_kind(obj)}", raw)
                continue
            if has_ids:
                doc_id = _id_string(obj.get(id_column))
                if doc_id is None:
                    value = obj.get(id_column)
                    what = "missing" if value is None or value == "" else _json_kind(value)
                    reject(row, f"id field {id_column!r} is {what}", raw)
                    continue
                if not _encodes(doc_id):
                    reject(row, f"id field {id_column!r} holds an unpaired surrogate escape (invalid Unicode)", raw)
                    continue
            else:
                doc_id = f"{split.source}:{row}"
            value = obj.get(field_name)
            if value is None:
                reject(row, f"{kind} field {field_name!r} is {'null' if field_name in obj else 'missing'}",
                       raw, doc_id)
                continue
            side = None
            if extra is not None:
                side, problem = _json_extra(obj, extra, tokenized)
                if problem:
                    reject(row, problem, raw, doc_id)
                    continue
            if tokenized:
                if not isinstance(value, list) or not all(
                        isinstance(t, int) and not isinstance(t, bool) for t in value):
                    reject(row, f"{kind} field {field_name!r} is not a list of integers", raw, doc_id)
                    continue
                token_lists.append(value)
                if side is not None:
                    mask_lists.append(side)
            else:
                if not isinstance(value, str):
                    reject(row, f"{kind} field {field_name!r} is {_json_kind(value)}, not a string",
                           raw, doc_id)
                    continue
                try:
                    size = len(value.encode("utf-8")) + (len(side.encode("utf-8")) if side is not None else 0)
                except UnicodeEncodeError:
                    what = "text" if side is None or _encodes(value) else "prompt"
                    reject(row, f"{what} holds an unpaired surrogate escape (invalid Unicode)", raw, doc_id)
                    continue
                if size > limits.document_bytes:
                    reject(row, _too_large(limits.document_bytes), raw, doc_id)
                    continue
                batch.texts.append(value)
                if side is not None:
                    batch.prompts.append(side)
            rows.append(row)
            ids.append(doc_id)
            if len(rows) >= BATCH_DOCS:
                yield _finish_jsonl(batch, rows, ids, token_lists, mask_lists, tokenized, extra)
                batch, rows, ids, token_lists, mask_lists = RawBatch(), [], [], [], []
    except _Corrupt as exc:
        reject(exc.offset, f"corrupt or truncated {split.compression or ''} file; reading stopped here "
                           f"({exc})".replace("  ", " "), "")
    if rows or batch.rejects:
        yield _finish_jsonl(batch, rows, ids, token_lists, mask_lists, tokenized, extra)


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


def _finish_jsonl(batch: RawBatch, rows: list[int], ids: list[str | None], token_lists: list[list[int]],
                  mask_lists: list[list[int]], tokenized: bool, extra: str | None) -> RawBatch:
    batch.rows, batch.ids = np.array(rows, np.int64), pa.array(ids, pa.string())
    batch.n_records = len(rows) + len(batch.rejects)
    if tokenized:
        batch.tokens = _int64_lists(token_lists)
        if extra is not None:
            batch.masks = _int64_lists(mask_lists)
    return batch


# -- Parquet ------------------------------------------------------------------------

def read_parquet(split: Split, id_column: str | None, column: str, tokenized: bool,
                 limits: Limits, extra: str | None = None) -> Iterator[RawBatch]:
    """Row group by row group, so damage in one costs only its own rows."""
    fs, path = filesystem(split.uri)
    row = split.first_row
    try:
        fh = fs.open_input_file(path)
    except OSError as exc:
        yield RawBatch(rejects=[Reject(split.source, row, f"unreadable Parquet file: {exc}")], n_records=1)
        return
    with fh:
        try:
            pf = pq.ParquetFile(fh)
        except (OSError, pa.ArrowException) as exc:
            reason = f"unreadable Parquet file (damaged or truncated footer): {exc}"
            yield RawBatch(rejects=[Reject(split.source, row, reason)], n_records=1)
            return
        groups = range(pf.metadata.num_row_groups) if split.row_groups is None else split.row_groups
        names = pf.schema_arrow.names
        has_ids = id_column is not None and id_column in names
        columns = [column] + ([id_column] if has_ids else []) + ([extra] if extra in names else [])
        # checked at planning, unless the footer was unreadable then
        missing = None if column in names else f"no column {column!r} in this file"
        if extra is not None and extra not in names and not missing:
            missing = f"{_extra_kind(tokenized)} column {extra!r} is missing in this file"
        for g in groups:
            group_end = row + pf.metadata.row_group(g).num_rows
            problem = missing
            if not missing:
                batches = pf.iter_batches(batch_size=BATCH_DOCS, row_groups=[g], columns=columns)
                while row < group_end:
                    try:
                        rb = next(batches)
                    except (OSError, pa.ArrowException, StopIteration) as exc:
                        problem = (f"unreadable Parquet data in row group {g} (rows {row}-{group_end - 1}): "
                                   f"{exc or 'the file holds fewer rows than its footer says'}")
                        break
                    yield _parquet_batch(split, rb, row, id_column if has_ids else None, column, tokenized,
                                         limits.document_bytes, extra)
                    row += rb.num_rows
            if problem:  # every row not read is a reject
                yield RawBatch(rejects=[Reject(split.source, r, problem) for r in range(row, group_end)],
                               n_records=group_end - row)
            row = group_end


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


def _parquet_batch(split: Split, rb: pa.RecordBatch, first_row: int, id_column: str | None,
                   column: str, tokenized: bool, max_bytes: int, extra: str | None = None) -> RawBatch:
    n = rb.num_rows
    rows = np.arange(first_row, first_row + n)
    batch = RawBatch(n_records=n)
    values = rb.column(column)
    ok = np.ones(n, dtype=bool)
    reasons: dict[int, str] = {}

    def bad(mask: np.ndarray, reason: str) -> None:
        for i in np.flatnonzero(mask & ok):
            reasons[int(i)] = reason
        ok[mask] = False

    if id_column is not None:
        ids = rb.column(id_column)
        if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)
                or pa.types.is_integer(ids.type)):
            bad(np.ones(n, bool), f"id column {id_column!r} has type {ids.type}, not string or integer")
            ids = pa.nulls(n, pa.string())
        else:
            ids = ids.cast(pa.string())
            try:
                ids.validate(full=True)
            except pa.ArrowInvalid:  # bytes that are not UTF-8: those rows are rejects, their ids null
                ids = pa.array(_utf8_texts(ids, n, f"id column {id_column!r}", bad), pa.string())
            bad(np.asarray(pc.fill_null(pc.equal(ids, ""), True)), f"id column {id_column!r} is null or empty")
    else:
        ids = pc.binary_join_element_wise(split.source, pa.array(rows).cast(pa.string()), ":")
    bad(np.asarray(values.is_null()), f"{'tokens' if tokenized else 'text'} column {column!r} is null")
    side = rb.column(extra) if extra is not None else None
    if side is not None:
        what = _extra_kind(tokenized)
        bad(np.asarray(side.is_null()), f"{what} column {extra!r} is null")
        wanted = (((pa.types.is_list(side.type) or pa.types.is_large_list(side.type))
                   and (pa.types.is_integer(side.type.value_type) or pa.types.is_boolean(side.type.value_type)))
                  if tokenized else _is_string(side.type))
        if not wanted:
            bad(np.ones(n, bool), f"{what} column {extra!r} has type {side.type}, not "
                                  f"{'a list of 0/1 (integers or booleans)' if tokenized else 'string'}")
        elif tokenized and pc.list_flatten(side).null_count:
            flat_nulls = pc.is_null(pc.list_flatten(side)).to_numpy(zero_copy_only=False)
            mask = np.zeros(n, bool)
            mask[pc.list_parent_indices(side).to_numpy()[flat_nulls]] = True
            bad(mask, f"{what} column {extra!r} holds a null")

    if tokenized:
        if not ((pa.types.is_list(values.type) or pa.types.is_large_list(values.type))
                and pa.types.is_integer(values.type.value_type)):
            bad(np.ones(n, bool), f"token column {column!r} has type {values.type}, not a list of integers")
        else:
            if pc.list_flatten(values).null_count:
                flat_nulls = pc.is_null(pc.list_flatten(values)).to_numpy(zero_copy_only=False)
                mask = np.zeros(n, bool)
                mask[pc.list_parent_indices(values).to_numpy()[flat_nulls]] = True
                bad(mask, f"token column {column!r} holds a null token id")
            batch.tokens = values
    else:
        prompts: list[Any] = []  # strings where the row is kept
        if not _is_string(values.type):
            bad(np.ones(n, bool), f"text column {column!r} has type {values.type}, not string")
            texts: list[Any] = [None] * n  # strings where the row is kept
        else:
            sizes = pc.fill_null(pc.binary_length(values), 0).to_numpy(zero_copy_only=False)
            if side is not None and _is_string(side.type):
                sizes = sizes + pc.fill_null(pc.binary_length(side), 0).to_numpy(zero_copy_only=False)
            bad(sizes > max_bytes, _too_large(max_bytes))
            texts = _utf8_texts(values, n, "text", bad)
        if side is not None and _is_string(side.type):
            prompts = _utf8_texts(side, n, "prompt", bad)
    keep = np.flatnonzero(ok)
    batch.rows, batch.ids = rows[keep], ids.take(pa.array(keep))
    if not tokenized:
        batch.texts = [texts[i] for i in keep]
        if side is not None:
            batch.prompts = [prompts[i] for i in keep]
    for i in np.flatnonzero(~ok):
        batch.rejects.append(Reject(split.source, int(rows[i]), reasons[int(i)], _value_excerpt(values, int(i)),
                                    ids[int(i)].as_py()))
    if tokenized and batch.tokens is not None:
        batch.tokens = batch.tokens.filter(pa.array(ok))
        if side is not None:
            batch.masks = side.filter(pa.array(ok))
    return batch


def _value_excerpt(values: pa.Array, i: int) -> str:
    """The start of a Parquet record's text or token list (what was wrong with it), cut before
    it is turned into Python (a rejected value may be huge)."""
    value = values.slice(i, 1)
    if pa.types.is_string(value.type) or pa.types.is_large_string(value.type):
        value = pc.binary_slice(value.cast(pa.large_binary()), 0, EXCERPT_CHARS * 4)
    elif pa.types.is_list(value.type) or pa.types.is_large_list(value.type):
        value = pc.list_slice(value, 0, EXCERPT_CHARS // 4)
    head = value[0].as_py()
    return "" if head is None else excerpt(head)


# -- plain text files -----------------------------------------------------------------

def read_text_file(split: Split, id_column: str | None, column: str, tokenized: bool,
                   limits: Limits, extra: str | None = None) -> Iterator[RawBatch]:
    """The whole file is one document, its id the file's source name."""
    batch = RawBatch(n_records=1)
    fs, path = filesystem(split.uri)
    try:
        size = fs.get_file_info(path).size
        if size > limits.document_bytes:  # a text file's bytes are its text
            with fs.open_input_stream(path) as fh:
                head = fh.read(EXCERPT_CHARS * 4)
            batch.rejects.append(Reject(split.source, 0, _too_large(limits.document_bytes), excerpt(head),
                                        split.source))
            yield batch
            return
        with fs.open_input_stream(path) as fh:
            data = fh.read()
    except OSError as exc:
        batch.rejects.append(Reject(split.source, 0, f"unreadable file ({exc})", "", split.source))
        yield batch
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        batch.rejects.append(Reject(split.source, 0, f"invalid UTF-8 at byte {exc.start} of the file",
                                    excerpt(data), split.source))
    else:
        batch.rows, batch.ids, batch.texts = np.zeros(1, np.int64), pa.array([split.source]), [text]
    yield batch


_READERS = {"parquet": read_parquet, "jsonl": read_jsonl, "text": read_text_file}


def read_split(split: Split, id_column: str | None, column: str, tokenized: bool,
               limits: Limits, extra: str | None = None) -> Iterator[RawBatch]:
    """Batches of documents and rejects of one split, in file order; ``extra`` names the column
    of each document's loss mask (tokenized input) or prompt (text)."""
    yield from _READERS[split.format](split, id_column, column, tokenized, limits, extra)
