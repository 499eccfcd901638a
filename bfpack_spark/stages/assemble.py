"""Stage 2: a group's chunks and its slice of the plan in, sequences and fragments out.

A sequence whose segments all come from one group's documents is built right
there, where the group was read (:func:`local_sequences`). Every other segment
leaves as a fragment (:func:`fragments`), is shuffled by ``seq_id``, and is joined
to its sequence's other fragments in the final reduce (:func:`assemble_fragments`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from bfpack_spark import faults
from bfpack_spark.packing.arrow import flatten_token_lists, gather_segments, list_array, sequences_table
from bfpack_spark.packing.plan import Plan
from bfpack_spark.schemas import FRAGMENTS, SEQUENCES

OUTPUT_ROWS = 2048


@dataclass(frozen=True)
class GroupPlan:
    """The plan's segments of one group's documents, in canonical order."""

    doc_index: np.ndarray  # document position within the group
    start: np.ndarray
    length: np.ndarray
    seq: np.ndarray
    slot: np.ndarray
    local: np.ndarray

    @classmethod
    def split(cls, plan: Plan, doc_group: np.ndarray, doc_index: np.ndarray,
              n_groups: int) -> list[GroupPlan]:
        """One slice per group; ``doc_group``/``doc_index`` locate each planned document."""
        group = doc_group[plan.doc]
        bounds = np.searchsorted(group, np.arange(n_groups + 1))
        slices = []
        for g in range(n_groups):
            s = slice(bounds[g], bounds[g + 1])
            slices.append(cls(doc_index[plan.doc[s]], plan.start[s], plan.length[s].astype(np.int32),
                              plan.seq[s], plan.slot[s].astype(np.int32), plan.local[s]))
        return slices


@dataclass
class _GroupTokens:
    doc_index: np.ndarray    # sorted document positions present in the rows
    doc_ids: pa.Array
    values: np.ndarray
    doc_offsets: np.ndarray

    @classmethod
    def from_rows(cls, rows: pa.Table) -> _GroupTokens:
        rows = rows.sort_by([("doc_index", "ascending"), ("chunk", "ascending")])
        doc_index = rows.column("doc_index").to_numpy()
        firsts = np.flatnonzero(np.diff(doc_index, prepend=-1) != 0)
        values, chunk_offsets = flatten_token_lists(rows.column("tokens"))  # 64-bit offsets
        doc_offsets = chunk_offsets[np.append(firsts, len(doc_index))]
        return cls(doc_index[firsts], rows.column("doc_id").take(pa.array(firsts)).combine_chunks(),
                   values, doc_offsets)

    def positions(self, doc_index: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.doc_index, doc_index)


def _batches(table: pa.Table, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """Batches in Spark's types; cast one batch at a time, so that a group holding more than
    2^31 tokens (built with 64-bit offsets) still fits Spark's 32-bit lists."""
    for batch in table.select(schema.names).to_batches(max_chunksize=OUTPUT_ROWS):
        yield batch.cast(schema)


def local_sequences(rows: pa.Table, plan: GroupPlan, run_id: str) -> Iterator[pa.RecordBatch]:
    """The sequences made only of this group's documents, built without moving a token."""
    faults.check("assemble")
    keep = np.flatnonzero(plan.local)
    if faults.active("drop_token") and keep.size:
        keep = keep[1:]  # a broken invariant, for the audit to catch
    if keep.size == 0:
        return
    group = _GroupTokens.from_rows(rows)
    order = keep[np.lexsort((plan.slot[keep], plan.seq[keep]))]
    seq = plan.seq[order]
    boundaries = np.flatnonzero(np.diff(seq, prepend=-1) != 0)
    seg_offsets = np.append(boundaries, len(order))
    pos = group.positions(plan.doc_index[order])
    tokens = gather_segments(group.values, group.doc_offsets, pos, plan.start[order], plan.length[order])
    table = sequences_table(seg_offsets, tokens, group.doc_ids.take(pa.array(pos)), plan.start[order],
                            plan.length[order], docs_column="doc_ids")
    table = table.append_column("seq_id", pa.array(seq[boundaries]))
    table = table.append_column("run_id", pa.array([run_id] * table.num_rows, pa.string()))
    yield from _batches(table, SEQUENCES)


def fragments(rows: pa.Table, plan: GroupPlan) -> Iterator[pa.RecordBatch]:
    """Every segment of this group that belongs to a sequence built elsewhere."""
    move = np.flatnonzero(~plan.local)
    if move.size == 0:
        return
    group = _GroupTokens.from_rows(rows)
    pos = group.positions(plan.doc_index[move])
    lengths = plan.length[move]
    tokens = gather_segments(group.values, group.doc_offsets, pos, plan.start[move], lengths)
    table = pa.table({
        "seq_id": pa.array(plan.seq[move]),
        "slot": pa.array(plan.slot[move]),
        "doc_id": group.doc_ids.take(pa.array(pos)),
        "seg_start": pa.array(plan.start[move].astype(np.int32)),
        "tokens": list_array(np.concatenate(([0], np.cumsum(lengths))), pa.array(tokens)),
    })
    yield from _batches(table, FRAGMENTS)


def assemble_fragments(frags: pa.Table, run_id: str) -> Iterator[pa.RecordBatch]:
    """Sequences from their fragments (the final reduce; fragments of a sequence arrive together)."""
    if frags.num_rows == 0:
        return
    frags = frags.sort_by([("seq_id", "ascending"), ("slot", "ascending")])
    seq = frags.column("seq_id").to_numpy()
    boundaries = np.flatnonzero(np.diff(seq, prepend=-1) != 0)
    seg_offsets = np.append(boundaries, len(seq))
    values, offsets = flatten_token_lists(frags.column("tokens"))
    lengths = np.diff(offsets)
    table = sequences_table(seg_offsets, values[offsets[0]:offsets[-1]], frags.column("doc_id").combine_chunks(),
                            frags.column("seg_start").to_numpy(), lengths, docs_column="doc_ids")
    table = table.append_column("seq_id", pa.array(seq[boundaries]))
    table = table.append_column("run_id", pa.array([run_id] * table.num_rows, pa.string()))
    yield from _batches(table, SEQUENCES)
