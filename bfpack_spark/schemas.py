"""Schemas of the rows between stages and of the output tables, in Arrow, Spark and Delta terms.

One Arrow definition per table; the Spark DDL used for ``mapInArrow`` and the Delta
schema recorded in the log are derived from it, so they cannot drift.
"""

from __future__ import annotations

import json
from enum import IntEnum

import numpy as np
import pyarrow as pa

from bfpack_spark.packing.arrow import binary_as_ids, ids_as_binary


def numbers(name: str, dtype: type) -> pa.Field:
    """A list of numbers that Spark only moves, stored as the bytes of its numpy array
    (:func:`~bfpack_spark.packing.arrow.ids_as_binary`; the field's metadata names the dtype):
    Spark moves a binary value between Python and its JVM as one buffer, a list element by element."""
    return pa.field(name, pa.binary(), metadata={"numpy": np.dtype(dtype).str})


def _numbers_dtype(schema: pa.Schema, name: str) -> np.dtype:
    """The numpy dtype of a :func:`numbers` field."""
    return np.dtype(schema.field(name).metadata[b"numpy"].decode())


def numbers_array(schema: pa.Schema, name: str, offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    """The :func:`numbers` column ``name`` of ``schema``: row i holds ``values[offsets[i]:offsets[i + 1]]``."""
    return ids_as_binary(offsets, values.astype(_numbers_dtype(schema, name), copy=False))


def numbers_of(table: pa.Table | pa.RecordBatch, schema: pa.Schema, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The :func:`numbers` column ``name`` (as ``schema`` defines it) of ``table``: every row's
    values concatenated, and the rows' offsets into them."""
    return binary_as_ids(table.column(name), _numbers_dtype(schema, name))

class ReadRow(IntEnum):
    """The kinds of rows out of the read stage (:data:`READ`'s ``kind``)."""

    DOC = 0      # one per document
    GROUP = 1    # one per group: its summary (``info``: a GroupSummary, stages.read)
    FILE = 2     # one per file it wrote (``info``: a StagedFile)
    RESIDUE = 3  # best-fit: the chunks its own BFD left (never collected: merge rounds in Spark tasks read them)


#: Rows out of the read stage (:class:`ReadRow` says which).
READ = pa.schema([
    ("kind", pa.int8()),
    ("group", pa.int32()),
    ("doc_index", pa.int64()),   # position of the document among its group's packable documents
    ("doc_id", pa.string()),
    ("n_tokens", pa.int64()),
    ("source", pa.string()),
    ("row", pa.int64()),
    ("info", pa.string()),
])

#: A group's documents in the run's workspace, between the read and the assembly.
STORED = pa.schema([
    ("doc_id", pa.string()),
    ("source", pa.string()),
    ("row", pa.int64()),
    ("tokens", pa.list_(pa.int32())),
    ("loss_mask", pa.list_(pa.int8())),  # aligned with tokens; null for runs without loss masks
])

#: Items (chunks, lengths only) through the packing rounds, in bundles: Spark moves a few rows of
#: long arrays far more cheaply than one row per item. One bundle per (source, target) when dealt ...
BUNDLE = pa.schema([
    ("target", pa.int32()),              # the partition of the round the items are packed in
    numbers("group", np.int32),
    numbers("doc_index", np.int64),
    numbers("chunk", np.int32),
    numbers("length", np.int32),
])
#: ... and one per (partition, group) once packed. ``rank`` is the item's sequence among the
#: partition's final ones (-1: not final, it goes to the next round). The partition's figures
#: (final sequences, moved items, residue per length bucket) ride on one of its bundles.
PACKED = pa.schema([
    ("part", pa.int32()),
    ("group", pa.int32()),
    numbers("doc_index", np.int64),
    numbers("chunk", np.int32),
    numbers("length", np.int32),
    numbers("rank", np.int64),
    numbers("slot", np.int32),
    numbers("local", np.bool_),
    ("n_final", pa.int64()),
    ("moved", pa.int64()),
    ("moved_tokens", pa.int64()),
    ("residue_buckets", pa.list_(pa.int32())),
    ("residue_counts", pa.list_(pa.int64())),
    # the partition's residue itself, when small (the driver may pack the last round): BUNDLE's items
    *(f.with_name(f"left_{f.name}") for f in BUNDLE if f.name != "target"),
])

class Order(IntEnum):
    """What the assembly of one group is told (:data:`ORDERS`' ``kind``)."""

    PLAN = 0  # where its items go: a packed bundle of round ``stage``
    DROP = 1  # one of its documents is a duplicate (``dropped``)
    MARK = 2  # that the group exists at all (every group is assembled)


ORDERS = pa.schema([
    ("kind", pa.int8()),
    ("group", pa.int32()),
    ("stage", pa.int32()),
    ("part", pa.int32()),
    numbers("doc_index", np.int64),
    numbers("chunk", np.int32),
    numbers("rank", np.int64),
    numbers("slot", np.int32),
    numbers("local", np.bool_),
    ("dropped", pa.int64()),
    ("first_source", pa.string()),
    ("first_row", pa.int64()),
    ("first_run", pa.string()),  # a duplicate of an id an earlier run packed: that run
])

class AssembledRow(IntEnum):
    """The kinds of rows out of the assembly (:data:`ASSEMBLED`'s ``kind``)."""

    FILE = 2      # a file a task wrote (``info``: a StagedFile), passed through the shuffle
    FRAGMENT = 3  # segments of a sequence built elsewhere, shuffled by ``seq_id``
    FIGURES = 4   # a group's packing figures (``info``: JSON)


#: Out of the assembly (:class:`AssembledRow` says which).
ASSEMBLED = pa.schema([
    ("kind", pa.int8()),
    ("seq_id", pa.int64()),
    ("slot", pa.int32()),
    ("doc_id", pa.string()),
    ("seg_start", pa.int32()),
    numbers("tokens", np.int32),
    numbers("loss_mask", np.int8),
    ("info", pa.string()),
])

SEQUENCES = pa.schema([
    ("seq_id", pa.int64()),
    ("input_ids", pa.list_(pa.int32())),
    ("doc_ids", pa.list_(pa.string())),
    ("seg_starts", pa.list_(pa.int32())),
    ("seg_lengths", pa.list_(pa.int32())),
    ("n_tokens", pa.int32()),
    ("run_id", pa.string()),
    ("loss_mask", pa.list_(pa.int8())),  # aligned with input_ids, 0: not a target; null for runs without masks
])

DOCUMENTS = pa.schema([
    ("doc_id", pa.string()),
    ("n_tokens", pa.int64()),
    ("n_chunks", pa.int32()),
    ("source", pa.string()),
    ("row", pa.int64()),
    ("run_id", pa.string()),
    ("loss_tokens", pa.int64()),  # tokens whose loss mask is 1; null for runs without masks
])

REJECTS = pa.schema([
    ("run_id", pa.string()),
    ("source", pa.string()),
    ("row", pa.int64()),
    ("doc_id", pa.string()),
    ("reason", pa.string()),
    ("reason_code", pa.string()),
    ("excerpt", pa.string()),
])

#: One length bucket of ``stats.truncations_by_length``: documents of that length, and the
#: truncations per document of best-fit packing and of concatenation.
TRUNCATIONS_BY_LENGTH = pa.struct([
    ("length", pa.string()),
    ("documents", pa.int64()),
    ("truncations_per_document", pa.float64()),
    ("concat_truncations_per_document", pa.float64()),
])

STATS = pa.schema([
    ("run_id", pa.string()),
    ("started_at", pa.string()),
    ("mode", pa.string()),
    ("strategy", pa.string()),
    ("seq_len", pa.int32()),
    ("config", pa.string()),
    ("input_files", pa.int32()),
    ("input_groups", pa.int32()),
    ("packing_partitions", pa.int32()),
    ("documents_read", pa.int64()),
    ("documents_packed", pa.int64()),
    ("documents_rejected", pa.int64()),
    ("tokens", pa.int64()),
    ("chunks", pa.int64()),
    ("sequences", pa.int64()),
    ("lower_bound", pa.int64()),
    ("overhead", pa.int64()),
    ("overhead_fraction", pa.float64()),
    ("padding_tokens", pa.int64()),
    ("mean_fill", pa.float64()),
    ("truncations_per_document", pa.float64()),
    ("documents_truncated", pa.int64()),
    ("concat_sequences", pa.int64()),
    ("concat_truncations_per_document", pa.float64()),
    ("concat_documents_truncated", pa.int64()),
    ("truncations_by_length", pa.list_(TRUNCATIONS_BY_LENGTH)),
    ("residual_items", pa.int64()),
    ("residual_sequences", pa.int64()),
    ("merge_rounds", pa.int32()),
    ("moved_segments", pa.int64()),
    ("moved_tokens", pa.int64()),
    ("fill_histogram", pa.list_(pa.int64())),
    ("segments_histogram", pa.list_(pa.int64())),
    ("audit_passed", pa.bool_()),
    ("audit_checks", pa.map_(pa.string(), pa.bool_())),
    ("audit_found", pa.map_(pa.string(), pa.int64())),
    ("audit_expected", pa.map_(pa.string(), pa.int64())),
    ("stage_seconds", pa.map_(pa.string(), pa.float64())),
    ("max_segments_per_sequence", pa.int32()),  # the cap (null: none)
    ("most_segments", pa.int64()),               # the most segments one sequence holds
    ("loss_tokens", pa.int64()),                 # tokens that are targets (loss mask 1); null without masks
    ("no_loss_tokens", pa.int64()),              # tokens that are not (loss mask 0)
    ("requests_retried", pa.int64()),            # object-store requests retried (throttled, dropped) up to the
                                                 # audit; null in runs of earlier versions
    ("tokenizer_engine", pa.string()),           # what encoded the text ("gigatoken 0.10.0"); null: tokenized input
    ("plan_first_round", pa.string()),           # best-fit: "in place" (each group packed where it was read)
                                                 # or "routed"; null: concat
    ("resumed_read_groups", pa.int32()),         # groups whose read an earlier attempt of the run finished
    ("resumed_assembly_groups", pa.int32()),     # groups whose assembly an earlier attempt finished
])

#: The map columns of ``stats`` (Arrow takes a map as a list of pairs, and gives one back so).
STATS_MAPS = [f.name for f in STATS if pa.types.is_map(f.type)]


def stats_table(row: dict) -> pa.Table:
    """A ``stats`` row (its maps as dicts) as a one-row table."""
    return pa.Table.from_pylist([{**row, **{k: list(row[k].items()) for k in STATS_MAPS}}], schema=STATS)


def stats_row_of(table_row: dict) -> dict:
    """A ``stats`` row as read from its table, its maps as dicts again."""
    return {**table_row, **{k: dict(table_row[k] or []) for k in STATS_MAPS}}


#: When a file was last modified, as its listing says (UTC, microseconds).
MODIFIED = pa.timestamp("us", tz="UTC")


def modified(modified_ns: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Listed modification times (ns since the epoch) as the ``inputs`` table records them: the one
    rounding that both the record and an incremental run's comparison with it use."""
    return pa.array(np.asarray(modified_ns) // 1000).cast(MODIFIED)

#: The input files of each run, as their listing gave them (what ``--mode incremental`` compares a
#: new listing with).
INPUTS = pa.schema([
    ("run_id", pa.string()),
    ("uri", pa.string()),
    ("source", pa.string()),
    ("size", pa.int64()),
    ("digest", pa.string()),    # bfpack before 0.2: a digest of the file's first and last 64 KiB; null since
    ("replaces", pa.string()),  # the earlier run that packed this file, where this run re-packed it
    ("modified", MODIFIED),     # the listing's modification time
    ("etag", pa.string()),      # the listing's ETag (S3); null on stores that give none
])

TABLES: dict[str, pa.Schema] = {"sequences": SEQUENCES, "documents": DOCUMENTS, "rejects": REJECTS,
                                 "inputs": INPUTS, "stats": STATS}

_DDL = {
    pa.int8(): "tinyint", pa.int32(): "int", pa.int64(): "bigint", pa.string(): "string",
    pa.float64(): "double", pa.bool_(): "boolean", pa.binary(): "binary", MODIFIED: "timestamp",
}
_DELTA = {
    pa.int8(): "byte", pa.int32(): "integer", pa.int64(): "long", pa.string(): "string",
    pa.float64(): "double", pa.bool_(): "boolean", MODIFIED: "timestamp",
}


def _ddl_type(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        return f"array<{_ddl_type(t.value_type)}>"
    if pa.types.is_map(t):
        return f"map<{_ddl_type(t.key_type)},{_ddl_type(t.item_type)}>"
    if pa.types.is_struct(t):
        return "struct<" + ",".join(f"{f.name}:{_ddl_type(f.type)}" for f in t) + ">"
    return _DDL[t]


def spark_types(schema: pa.Schema) -> dict[str, str]:
    """The Spark type (DDL) of each field of an Arrow schema."""
    return {f.name: _ddl_type(f.type) for f in schema}


def spark_ddl(schema: pa.Schema) -> str:
    """The Spark DDL string of an Arrow schema (for ``mapInArrow``)."""
    return ", ".join(f"`{name}` {t}" for name, t in spark_types(schema).items())


def _delta_type(t: pa.DataType):
    if pa.types.is_list(t):
        return {"type": "array", "elementType": _delta_type(t.value_type), "containsNull": True}
    if pa.types.is_map(t):
        return {"type": "map", "keyType": _delta_type(t.key_type), "valueType": _delta_type(t.item_type),
                "valueContainsNull": True}
    if pa.types.is_struct(t):
        return {"type": "struct", "fields": [_delta_field(f) for f in t]}
    return _DELTA[t]


def _delta_field(f: pa.Field) -> dict:
    return {"name": f.name, "type": _delta_type(f.type), "nullable": True, "metadata": {}}


def delta_schema_json(schema: pa.Schema) -> str:
    """The Delta (Spark) schema of a table, every field nullable: what Spark reads back from the
    Parquet files, so that both commit paths record the same schema."""
    return json.dumps({"type": "struct", "fields": [_delta_field(f) for f in schema]}, separators=(",", ":"))


def schemas_markdown() -> str:
    """The five tables' exact columns and Spark types, as the docs site shows them (rendered from
    the schemas the writers use, so the page cannot drift from the tables)."""
    parts = []
    for name, schema in TABLES.items():
        columns = "\n".join(f"{column:<34} {t}" for column, t in spark_types(schema).items())
        parts.append(f"`{name}`\n\n```text\n{columns}\n```\n")
    return "\n".join(parts)
