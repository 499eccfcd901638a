"""Schemas of the intermediate rows and of the output tables, in Arrow and Spark terms.

One definition per table: the Arrow schema is what the stages produce, and the
Spark DDL used for ``mapInArrow`` is derived from it, so the two cannot drift.
"""

from __future__ import annotations

import pyarrow as pa

#: Rows of the read stage: one per chunk of a document (kind 0), per reject (kind 1), and one
#: per group with the number of records its readers consumed in ``row`` (kind 2).
CHUNK, REJECT, COUNT = 0, 1, 2
READ = pa.schema([
    ("kind", pa.int8()),
    ("group", pa.int32()),
    ("doc_index", pa.int64()),   # position of the document within its group
    ("chunk", pa.int32()),       # position of the chunk within its document
    ("doc_id", pa.string()),
    ("doc_tokens", pa.int64()),  # length of the whole document
    ("tokens", pa.list_(pa.int32())),
    ("source", pa.string()),
    ("row", pa.int64()),
    ("reason", pa.string()),
    ("excerpt", pa.string()),
])

#: Pieces of sequences that are assembled after a shuffle by ``seq_id``.
FRAGMENTS = pa.schema([
    ("seq_id", pa.int64()),
    ("slot", pa.int32()),
    ("doc_id", pa.string()),
    ("seg_start", pa.int32()),
    ("tokens", pa.list_(pa.int32())),
])

SEQUENCES = pa.schema([
    ("seq_id", pa.int64()),
    ("input_ids", pa.list_(pa.int32())),
    ("doc_ids", pa.list_(pa.string())),
    ("seg_starts", pa.list_(pa.int32())),
    ("seg_lengths", pa.list_(pa.int32())),
    ("n_tokens", pa.int32()),
    ("run_id", pa.string()),
])

DOCUMENTS = pa.schema([
    ("doc_id", pa.string()),
    ("n_tokens", pa.int64()),
    ("n_chunks", pa.int32()),
    ("source", pa.string()),
    ("row", pa.int64()),
    ("run_id", pa.string()),
])

REJECTS = pa.schema([
    ("run_id", pa.string()),
    ("source", pa.string()),
    ("row", pa.int64()),
    ("doc_id", pa.string()),
    ("reason", pa.string()),
    ("excerpt", pa.string()),
])

_DDL = {
    pa.int8(): "tinyint", pa.int32(): "int", pa.int64(): "bigint", pa.string(): "string",
    pa.float64(): "double", pa.bool_(): "boolean",
}


def _ddl_type(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        return f"array<{_ddl_type(t.value_type)}>"
    return _DDL[t]


def spark_ddl(schema: pa.Schema) -> str:
    """The Spark DDL string of an Arrow schema (for ``mapInArrow``)."""
    return ", ".join(f"`{f.name}` {_ddl_type(f.type)}" for f in schema)
