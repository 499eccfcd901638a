"""Task side: reading input files, one module per format, and the rejects they make.

The read stage's tasks call :func:`read_group_splits` for the splits of their group (the driver
planned them from the listing, :mod:`bfpack_spark.io.listing`): files are opened with the size the
listing gave, small ones read ahead (:mod:`.fetch`), each read by its format's reader (:mod:`.jsonl`,
:mod:`.parquet`, :mod:`.text`; compressed JSON lines through the salvage decoder, :mod:`.inflate`),
and the documents of consecutive small files handed on in batches of about :data:`~.base.BATCH_DOCS`
(a tokenizer call, a Spark batch and a workspace batch each cost the same for 1 document or 2,048).
Every record that is not a document becomes a reject with a reason and a code (:mod:`.base`).
"""

from __future__ import annotations

from collections.abc import Iterator

from bfpack_spark.io.formats.base import BATCH_BYTES, BATCH_DOCS, Fields, RawBatch, Split
from bfpack_spark.io.formats.fetch import Opened, opened
from bfpack_spark.io.formats.jsonl import Lines, first_record, read_jsonl
from bfpack_spark.io.formats.parquet import Rows, read_parquet
from bfpack_spark.io.formats.text import read_text


def _has_ids(file: Opened, fields: Fields) -> bool | None:
    """A JSON-lines piece's id convention, from its file's first record when the piece starts later (None:
    decided as the file is read from its start)."""
    split = file.split
    if split.byte_range is None or split.byte_range[0] == 0 or fields.id_column is None:
        return None
    first = first_record(file, fields.limits.line_bytes)
    return first is not None and fields.id_column in first


def read_split(split: Split, fields: Fields, file: Opened | None = None) -> Iterator[RawBatch]:
    """Batches of documents and rejects of one split, in file order (``file``: the split opened)."""
    file = file or Opened(split)
    if split.format == "parquet":
        yield from read_parquet(file, fields)
    elif split.format == "text":
        yield from read_text(file, fields)
    else:
        yield from read_jsonl(file, fields, _has_ids(file, fields))


def _batches(splits: list[Split], fields: Fields) -> Iterator[tuple[Split, RawBatch]]:
    """Every split's batches, in order; the documents of consecutive Parquet files checked together, and
    those of consecutive JSON-lines files handed out together."""
    rows, lines = Rows(fields), Lines(fields)
    for file in opened(splits):
        split = file.split
        # the documents stay in file order: what waits from files of another format goes first
        yield from ((split, b) for b in (lines.flush() if split.format == "parquet" else rows.flush()))
        if split.format == "parquet":
            batches = read_parquet(file, fields, rows)
        elif split.format == "jsonl":
            batches = read_jsonl(file, fields, _has_ids(file, fields), lines)
        else:
            yield from ((split, b) for b in lines.flush())
            batches = read_text(file, fields)
        yield from ((split, b) for b in batches)
    yield from ((splits[-1], b) for b in rows.flush())
    yield from ((splits[-1], b) for b in lines.flush())


def read_group_splits(splits: list[Split], fields: Fields) -> Iterator[RawBatch]:
    """The documents and rejects of a group's splits, in order, small files' batches joined."""
    held: list[RawBatch] = []
    docs = size = 0
    seen = None
    for split, batch in _batches(splits, fields):
        if split is not seen:
            seen = split
            size += split.size if split.whole else BATCH_BYTES  # a piece of a large file: batches of its own
        held.append(batch)
        docs += len(batch)
        if docs >= BATCH_DOCS or size >= BATCH_BYTES:
            yield RawBatch.concat(held)
            held, docs, size = [], 0, 0
    if held:
        yield RawBatch.concat(held)
