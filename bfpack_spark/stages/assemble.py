"""Stage 4, assemble: each group's tokens and its orders in; table files and fragments out.

One task per group opens the group's documents in the workspace and gets its orders
(where each chunk goes, which documents are duplicates). It writes, as Parquet files of
this run attempt, the sequences made only of its own documents (nothing moves), its
documents and its duplicate rejects. Every other segment leaves as a *fragment*; the
fragments are shuffled by ``seq_id`` and joined into sequences in a final reduce
(:func:`join_fragments`). Only descriptions of written files (and small figures) reach
the driver.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
from pyspark import TaskContext
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from bfpack_spark import faults
from bfpack_spark.io.formats.base import Reject, position
from bfpack_spark.io.store.workspace import Workspace
from bfpack_spark.io.tables.staging import StagedFile, Staging
from bfpack_spark.packing.arrow import ChunkedTokens, sequences_table
from bfpack_spark.packing.chunking import chunk_documents
from bfpack_spark.packing.layout import concat_pieces
from bfpack_spark.packing.plan import pack_in_place
from bfpack_spark.schemas import (
    ASSEMBLED,
    DOCUMENTS,
    ORDERS,
    SEQUENCES,
    AssembledRow,
    Order,
    numbers_array,
    numbers_of,
    spark_ddl,
)
from bfpack_spark.spark.orders import as_orders
from bfpack_spark.spark.partitioning import counted, exact_partitions
from bfpack_spark.stages.read import rejects_table
from bfpack_spark.stats.figures import document_figures, segment_bins, sequence_figures
from bfpack_spark.stats.packing import PackingStats
from bfpack_spark.tokenize import load_tokenizer

OUTPUT_ROWS = 2048
EXCERPT_TOKENS = 64
#: A task of the final reduce joins at most about this many moved tokens (32 MB).
REDUCE_TOKENS = 8 * 2**20
#: Local sequences are built and written this many tokens at a time (64 MB).
SLICE_TOKENS = 16 * 2**20


def reduce_partitions(moved_segments: int, moved_tokens: int, merge_items: int) -> int:
    """Tasks of the final reduce: at most ``merge_items`` segments and about REDUCE_TOKENS tokens each
    (length-sorted input moves few segments but many tokens)."""
    return max(1, -(-moved_segments // merge_items), -(-moved_tokens // REDUCE_TOKENS))


@dataclass(frozen=True, kw_only=True)
class Assembly:
    """What every assembly task needs to know (small; pickled into the tasks)."""

    seq_len: int
    strategy: str
    staging: Staging
    workspace: Workspace
    tokenizer: str
    eos_token: str | None
    concat_offsets: np.ndarray  # first token of each group in the concatenated stream (packable documents)
    concat_total: int
    first_ids: tuple[np.ndarray, ...] = ()  # best-fit: first sequence id of each partition, per round
    bos_token: str | None = None
    loss_masks: bool = False                # the documents carry loss masks, and so do the sequences
    max_segments: int | None = None         # the cap on segments per sequence (the in-place round's too)
    in_place_fill: float | None = None      # best-fit: round 0 packed each group on its own, to this fill

    def figures(self, table: pa.Table) -> dict:
        """The audit's figures of a sequences file part."""
        return sequence_figures(table, self.seq_len, segment_bins(self.max_segments))

    def sequence_ids(self, stage: np.ndarray, part: np.ndarray, rank: np.ndarray) -> np.ndarray:
        """Sequence id of an item whose sequence became final in round ``stage``, partition ``part``."""
        base = np.cumsum([0] + [len(f) for f in self.first_ids])
        return np.concatenate(self.first_ids)[base[stage] + part] + rank


def _batch_parts(lengths: np.ndarray) -> Iterator[slice]:
    """Runs of consecutive segments, one Spark batch each: at most OUTPUT_ROWS segments and about
    SLICE_TOKENS tokens (a segment holds at most MAX_SEQ_LEN, so a batch stays far below the 2 GiB a
    binary column allows, however many tokens a group moves)."""
    ends = np.cumsum(lengths)
    start = 0
    while start < lengths.shape[0]:
        before = int(ends[start - 1]) if start else 0
        stop = min(start + OUTPUT_ROWS, int(np.searchsorted(ends, before + SLICE_TOKENS, side="right")))
        stop = max(stop, start + 1)
        yield slice(start, stop)
        start = stop


def _info(kind: int, info: str) -> pa.RecordBatch:
    row = {name: pa.nulls(1, f.type) for name, f in zip(ASSEMBLED.names, ASSEMBLED)}
    row.update(kind=pa.array([kind], pa.int8()), info=pa.array([info], pa.string()))
    return pa.RecordBatch.from_pydict(row, schema=ASSEMBLED)


def _slices(order: np.ndarray, firsts: np.ndarray, lengths: np.ndarray) -> Iterator[np.ndarray]:
    """``order`` (segments sorted by sequence; ``firsts`` where each sequence starts) cut at sequence
    boundaries into slices of about SLICE_TOKENS tokens."""
    tokens_before = (np.cumsum(lengths[order]) - lengths[order])[firsts]
    block = tokens_before // SLICE_TOKENS
    cuts = np.append(firsts[np.flatnonzero(np.diff(block, prepend=-1) != 0)], len(order))
    for s, e in zip(cuts[:-1], cuts[1:]):
        yield order[s:e]


def _with_run(table: pa.Table, seq_ids: np.ndarray, run_id: str) -> pa.Table:
    table = table.append_column("seq_id", pa.array(seq_ids, pa.int64()))
    table = table.append_column("run_id", pa.repeat(run_id, table.num_rows))
    if "loss_mask" not in table.column_names:
        table = table.append_column("loss_mask", pa.nulls(table.num_rows, SEQUENCES.field("loss_mask").type))
    return table.select(SEQUENCES.names)


@dataclass
class _Segments:
    """A group's chunks in canonical order, and where the plan puts each."""

    doc: np.ndarray      # position of the chunk's document in the group's stored documents
    start: np.ndarray
    length: np.ndarray
    seq: np.ndarray
    slot: np.ndarray
    local: np.ndarray


def _concat_segments(lengths: np.ndarray, kept: np.ndarray, first_token: int, total: int,
                     seq_len: int) -> _Segments:
    """The concatenation baseline for one group: the stream of every group's packable documents,
    cut every ``seq_len``; a sequence is local when it lies within this group's stretch. A
    segment's slot is its token offset in its sequence, so slots order the pieces of a sequence
    that spans groups too."""
    kept_lengths = lengths[kept]
    doc, start, length, seq = concat_pieces(kept_lengths, seq_len, first_token)
    position = first_token + (np.cumsum(kept_lengths) - kept_lengths)[doc] + start
    end = first_token + int(kept_lengths.sum())
    local = (seq * seq_len >= first_token) & (np.minimum((seq + 1) * seq_len, total) <= end)
    return _Segments(kept[doc], start, length, seq, position - seq * seq_len, local)


def _plan_segments(group: int, lengths: np.ndarray, kept: np.ndarray, bundles: pa.Table,
                   ctx: Assembly) -> _Segments:
    """The group's chunks and where the plan puts them: the bundles (one per round and partition)
    place them all, or, where round 0 packed the group on its own, the items that round left; the
    rest it places again here, from the same lengths."""
    packed = None
    if ctx.in_place_fill is not None:
        if kept.shape[0] != lengths.shape[0]:
            raise RuntimeError("a plan packed in place with documents dropped after the read")
        chunks, packed = pack_in_place(lengths, ctx.seq_len, ctx.in_place_fill, ctx.max_segments)
    else:
        chunks = chunk_documents(lengths[kept], ctx.seq_len)
    seq = np.empty(len(chunks), np.int64)
    slot = np.empty(len(chunks), np.int64)
    local = np.ones(len(chunks), bool)
    home = np.zeros(len(chunks), bool) if packed is None else packed.final  # final in an in-place round 0
    if packed is not None:
        seq[home] = ctx.sequence_ids(np.zeros(1, np.int64), np.array([group]), packed.rank[home])
        slot[home] = packed.slot[home]
    rest = np.flatnonzero(~home)
    items = {c: numbers_of(bundles, ORDERS, c)[0] for c in ("doc_index", "chunk", "slot", "local")}
    items["rank"], rank_offsets = numbers_of(bundles, ORDERS, "rank")
    per_row = np.diff(rank_offsets)
    final = items["rank"] >= 0  # each item is final in exactly one round
    stage = np.repeat(bundles.column("stage").to_numpy(), per_row)[final]
    part = np.repeat(bundles.column("part").to_numpy(), per_row)[final]
    items = {c: v[final] for c, v in items.items()}
    order = np.lexsort((items["chunk"], items["doc_index"]))
    if not (order.shape[0] == rest.shape[0] and np.array_equal(items["doc_index"][order], kept[chunks.doc[rest]])
            and np.array_equal(items["chunk"][order], chunks.index[rest])):
        raise RuntimeError(f"the plan ({order.shape[0]} segments) does not match this group's "
                           f"{rest.shape[0]} chunks")
    seq[rest] = ctx.sequence_ids(stage[order], part[order], items["rank"][order])
    slot[rest], local[rest] = items["slot"][order], items["local"][order]
    return _Segments(kept[chunks.doc], chunks.start, chunks.length, seq, slot, local)


def _excerpts(tokens: ChunkedTokens, docs: np.ndarray, ctx: Assembly) -> list[str]:
    """The start of each document's text (decoded from its first tokens, without the
    end-of-document token a short one ends with), for a reject row."""
    tokenizer = load_tokenizer(ctx.tokenizer, ctx.eos_token, ctx.bos_token)
    heads = [tokens.head(int(d), EXCERPT_TOKENS) for d in docs]
    heads = [h[1:] if len(h) and h[0] == tokenizer.bos_id else h for h in heads]
    return [tokenizer.decode(list(h[:-1] if len(h) and h[-1] == tokenizer.eos_id else h)) for h in heads]


def assemble_group(group: int, orders: pa.Table, ctx: Assembly) -> Iterator[pa.RecordBatch]:
    """Everything about one group that can be written where its tokens are: its files (FILE rows), the
    segments of sequences made elsewhere (FRAGMENT rows) and its figures (a FIGURES row, last).

    Then the task records that it finished, in the workspace, with its fragments: an attempt of the same
    run after a lost driver, given the same orders, replays the group from what it wrote (each file's
    footer checked first) instead of assembling it again."""
    digest = _orders_digest(orders)
    replayed = _replayed(group, digest, ctx)
    if replayed is not None:
        yield from replayed
        return
    faults.check("assemble")
    faults.check(f"assemble:{group}")
    files: list[str] = []
    figures, n_fragments = None, 0
    with ctx.workspace.group_writer(group, ASSEMBLED, folder="fragments") as fragments:
        for batch in _assembled(group, orders, ctx):
            kind = batch.column("kind")[0].as_py() if batch.num_rows else None
            if kind == AssembledRow.FRAGMENT:
                fragments.write_batch(batch)
                n_fragments += batch.num_rows
            elif kind == AssembledRow.FILE:
                files.append(batch.column("info")[0].as_py())
            elif kind == AssembledRow.FIGURES:
                figures = batch.column("info")[0].as_py()
            yield batch
    ctx.workspace.write_record("assemble", group, {"orders": digest, "files": files, "figures": figures,
                                                   "fragments": n_fragments})


def _orders_digest(orders: pa.Table) -> str:
    """What an assembly task was told (its orders, in a canonical order)."""
    keys = [(name, "ascending") for name in ("kind", "stage", "part", "dropped")]
    content = orders.sort_by(keys).to_pydict()  # values, not buffers: the same orders, however Spark laid them out
    return hashlib.sha256(pickle.dumps([(name, content[name]) for name in ORDERS.names])).hexdigest()[:16]


def _replayed(group: int, digest: str, ctx: Assembly) -> list[pa.RecordBatch] | None:
    """The rows of a group an earlier attempt of this run assembled, from its record, its files and its
    fragments; None where there is no record for these orders, or what it describes is not all there."""
    record = ctx.workspace.read_record("assemble", group)
    if record is None or record.get("orders") != digest or record.get("figures") is None:
        return None
    files = [StagedFile.from_json(f) for f in record["files"]]
    if not all(ctx.staging.holds(f) for f in files):
        return None
    try:
        fragments = ctx.workspace.read_group(group, folder="fragments")
    except (OSError, pa.ArrowException):
        return None
    if fragments.num_rows != record["fragments"]:
        return None
    figures = {**json.loads(record["figures"]), "resumed": True}
    return [*(_info(AssembledRow.FILE, f) for f in record["files"]), *fragments.to_batches(),
            _info(AssembledRow.FIGURES, json.dumps(figures))]


def _assembled(group: int, orders: pa.Table, ctx: Assembly) -> Iterator[pa.RecordBatch]:
    stored = ctx.workspace.read_group(group)
    kind = orders.column("kind").to_numpy()
    drops = orders.filter(pa.array(kind == Order.DROP))
    drops = drops.take(pa.array(np.argsort(drops.column("dropped").to_numpy())))
    dropped = drops.column("dropped").to_numpy()
    tokens = ChunkedTokens(stored.column("tokens"))
    masks = ChunkedTokens(stored.column("loss_mask")) if ctx.loss_masks else None
    lengths = tokens.lengths
    keep = np.ones(stored.num_rows, bool)
    keep[dropped] = False
    kept = np.flatnonzero(keep)
    L = ctx.seq_len
    if ctx.strategy == "concat":
        segs = _concat_segments(lengths, kept, int(ctx.concat_offsets[group]), ctx.concat_total, L)
    else:
        segs = _plan_segments(group, lengths, kept, orders.filter(pa.array(kind == Order.PLAN)), ctx)
    doc_ids = stored.column("doc_id").combine_chunks()
    name = f"group-{group:07d}"
    run_id = ctx.staging.run_id

    local = np.flatnonzero(segs.local)
    if faults.active("drop_token") and local.size:
        local = local[1:]  # a broken invariant, for the audit to catch
    if local.size:
        order = local[np.lexsort((segs.slot[local], segs.seq[local]))]
        firsts = np.flatnonzero(np.diff(segs.seq[order], prepend=-1) != 0)
        with ctx.staging.writer("sequences", name, SEQUENCES, ctx.figures) as out:
            for part in _slices(order, firsts, segs.length):  # a row group's worth at a time
                seq = segs.seq[part]
                starts = np.flatnonzero(np.diff(seq, prepend=-1) != 0)
                doc, start, length = segs.doc[part], segs.start[part], segs.length[part]
                out.write(_with_run(sequences_table(
                    np.append(starts, len(part)), tokens.gather(doc, start, length), doc_ids.take(pa.array(doc)),
                    start, length, docs_column="doc_ids",
                    loss_mask=masks.gather(doc, start, length) if masks else None), seq[starts], run_id))
        assert out.staged is not None  # local.size > 0: rows were written
        yield _info(AssembledRow.FILE, out.staged.to_json())

    yield from _fragments(segs, tokens, masks, doc_ids)
    if kept.size:
        n_tokens = lengths[kept]
        n_chunks = -(-n_tokens // L)
        kept_masks = masks.gather(kept, np.zeros_like(kept), n_tokens) if masks else None
        if kept_masks is not None:
            ends = np.cumsum(kept_masks, dtype=np.int64)[np.cumsum(n_tokens) - 1]
            loss_tokens = pa.array(np.diff(ends, prepend=0))
        else:
            loss_tokens = pa.nulls(kept.size, pa.int64())
        documents = pa.table({
            "doc_id": doc_ids.take(pa.array(kept)), "n_tokens": pa.array(n_tokens, pa.int64()),
            "n_chunks": pa.array(n_chunks.astype(np.int32)),
            "source": stored.column("source").combine_chunks().take(pa.array(kept)),
            "row": stored.column("row").combine_chunks().take(pa.array(kept)),
            "run_id": pa.repeat(run_id, kept.size), "loss_tokens": loss_tokens}, schema=DOCUMENTS)
        figures = document_figures(documents.column("doc_id").combine_chunks(), n_tokens, n_chunks, L, kept_masks)
        yield _info(AssembledRow.FILE, ctx.staging.write("documents", name, documents, figures).to_json())
    if dropped.size:
        excerpts = _excerpts(tokens, dropped, ctx)
        yield _info(AssembledRow.FILE, ctx.staging.write("rejects", f"duplicates-{group:07d}",
                                            _duplicate_rejects(stored, drops, dropped, excerpts, ctx)).to_json())
    yield _info(AssembledRow.FIGURES, json.dumps(_figures(lengths[kept], segs, int(ctx.concat_offsets[group]), L)))


def _fragments(segs: _Segments, tokens: ChunkedTokens, masks: ChunkedTokens | None,
               doc_ids: pa.Array) -> Iterator[pa.RecordBatch]:
    """The segments of sequences made elsewhere (FRAGMENT rows), in batches a Spark batch can hold."""
    moving = np.flatnonzero(~segs.local)
    for run in _batch_parts(segs.length[moving]):
        m = moving[run]
        lengths_m = segs.length[m]
        offsets_m = np.concatenate(([0], np.cumsum(lengths_m)))
        yield pa.RecordBatch.from_pydict({
            "kind": pa.array(np.full(m.shape[0], AssembledRow.FRAGMENT, np.int8)),
            "seq_id": pa.array(segs.seq[m], pa.int64()),
            "slot": pa.array(segs.slot[m].astype(np.int32)),
            "doc_id": doc_ids.take(pa.array(segs.doc[m])),
            "seg_start": pa.array(segs.start[m].astype(np.int32)),
            "tokens": numbers_array(ASSEMBLED, "tokens", offsets_m,
                                    tokens.gather(segs.doc[m], segs.start[m], lengths_m)),
            "loss_mask": (numbers_array(ASSEMBLED, "loss_mask", offsets_m,
                                        masks.gather(segs.doc[m], segs.start[m], lengths_m))
                          if masks else pa.nulls(m.shape[0], pa.binary())),
            "info": pa.nulls(m.shape[0], pa.string()),
        }, schema=ASSEMBLED)


def _duplicate_rejects(stored: pa.Table, drops: pa.Table, dropped: np.ndarray, excerpts: list[str],
                       ctx: Assembly) -> pa.Table:
    sources = stored.column("source").combine_chunks().take(pa.array(dropped)).to_pylist()
    rows = stored.column("row").combine_chunks().take(pa.array(dropped)).to_pylist()
    ids = stored.column("doc_id").combine_chunks().take(pa.array(dropped)).to_pylist()
    rejects = [Reject(src, row, f"duplicate id; first seen in {first_src}{f' (run {run})' if run else ''} "
                                f"at {position(first_src, first_row)}", excerpt, doc_id)
               for src, row, doc_id, first_src, first_row, run, excerpt in zip(
                   sources, rows, ids, drops.column("first_source").to_pylist(),
                   drops.column("first_row").to_pylist(), drops.column("first_run").to_pylist(), excerpts)]
    return rejects_table(rejects, ctx.staging.run_id)


def _figures(kept_lengths: np.ndarray, segs: _Segments, first_token: int, seq_len: int) -> dict:
    """Additive figures of the group: best-fit and concatenation truncations (the concat baseline's
    from this group's place in the stream, whatever the strategy), and what moves."""
    bfd = PackingStats.from_pieces(kept_lengths, -(-kept_lengths // seq_len), 0, seq_len)
    concat_doc = concat_pieces(kept_lengths, seq_len, first_token)[0]
    concat = PackingStats.from_pieces(kept_lengths, np.bincount(concat_doc, minlength=kept_lengths.shape[0]),
                                      0, seq_len)
    moved = ~segs.local
    return {"bfd": asdict(bfd), "concat": asdict(concat), "moved_segments": int(moved.sum()),
            "moved_tokens": int(segs.length[moved].sum())}


def join_fragments(batches, ctx: Assembly) -> Iterator[pa.RecordBatch]:
    """The final reduce: sequences from their fragments (those of a sequence arrive together);
    file descriptions and figures pass through."""
    batches = list(batches)
    if not batches:
        return
    table = pa.Table.from_batches(batches)
    kind = table.column("kind").to_numpy()
    yield from table.filter(pa.array(kind != AssembledRow.FRAGMENT)).to_batches()
    frags = table.filter(pa.array(kind == AssembledRow.FRAGMENT))
    if frags.num_rows == 0:
        return
    frags = frags.sort_by([("seq_id", "ascending"), ("slot", "ascending")])
    seq = frags.column("seq_id").to_numpy()
    firsts = np.flatnonzero(np.diff(seq, prepend=-1) != 0)
    values, offsets = numbers_of(frags, ASSEMBLED, "tokens")
    masks = numbers_of(frags, ASSEMBLED, "loss_mask")[0] if ctx.loss_masks else None
    sequences = _with_run(sequences_table(np.append(firsts, len(seq)), values,
                                          frags.column("doc_id").combine_chunks(),
                                          frags.column("seg_start").to_numpy(), np.diff(offsets),
                                          docs_column="doc_ids", loss_mask=masks),
                          seq[firsts], ctx.staging.run_id)
    name = f"merged-{TaskContext.get().partitionId():05d}"  # type: ignore[union-attr]  # in a task: never None
    yield _info(AssembledRow.FILE, ctx.staging.write("sequences", name, sequences, ctx.figures(sequences)).to_json())


@dataclass
class Assembled:
    """Descriptions of every file the assembly wrote, and each group's figures."""

    files: list[StagedFile]
    figures: list[dict]


def _orders(spark, plan_orders: DataFrame | None, drops: DataFrame | None, n_groups: int) -> DataFrame:
    """Every group's orders: one MARK per group (so that every group is assembled), its
    duplicates' DROP orders, and the plan's PLAN orders (best-fit only)."""
    orders = as_orders(spark.range(0, n_groups), Order.MARK, group=F.col("id"))
    if drops is not None:
        orders = orders.unionByName(as_orders(drops, Order.DROP, dropped=F.col("doc_index"), **{
            c: F.col(c) for c in ("group", "first_source", "first_row", "first_run")}))
    if plan_orders is not None:
        orders = orders.unionByName(plan_orders)
    return orders


def assemble(spark, plan_orders: DataFrame | None, drops: DataFrame | None, *, ctx: Assembly, n_groups: int,
             n_reduce: int) -> Assembled:
    """Run the assembly (one task per group) and the final reduce of ``n_reduce`` tasks."""
    def by_group(batches):
        batches = list(batches)
        if not batches:
            return
        table = pa.Table.from_batches(batches)
        groups = table.column("group").to_numpy()
        for g in np.unique(groups):
            yield from assemble_group(int(g), table.filter(pa.array(groups == g)), ctx)

    orders = exact_partitions(_orders(spark, plan_orders, drops, n_groups), n_groups, "group")
    rows = (orders.mapInArrow(counted(by_group), spark_ddl(ASSEMBLED))
            .repartition(n_reduce, "seq_id")
            .mapInArrow(counted(lambda batches: join_fragments(batches, ctx)), spark_ddl(ASSEMBLED))
            .select("kind", "info").collect())
    return Assembled([StagedFile.from_json(r["info"]) for r in rows if r["kind"] == AssembledRow.FILE],
                     [json.loads(r["info"]) for r in rows if r["kind"] == AssembledRow.FIGURES])
