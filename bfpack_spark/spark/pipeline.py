"""The packing job on Spark: read and chunk, plan from lengths, assemble, write, audit, commit.

1. *read* (one task per input group, :mod:`bfpack_spark.stages.read`): documents are
   read, tokenized and cut into chunk rows; bad records become reject rows. Cached.
2. *plan* (lengths only, :mod:`bfpack_spark.packing.plan`): duplicates are resolved,
   chunks are dealt to length-stratified packing partitions (driver), Spark tasks pack
   each partition by BFD, and a final reduce packs the residue of under-filled
   sequences again; every chunk gets its sequence and slot (or the concat baseline's).
3. *assemble* (:mod:`bfpack_spark.stages.assemble`): each group builds the sequences
   made only of its own documents; the other segments move once, shuffled by
   ``seq_id``, and are joined in the final reduce.
4. *write*: Spark writes the Parquet files of every table; an audit checks that no
   token was lost or doubled; then one Delta commit per table.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from bfpack_spark import faults
from bfpack_spark.config import PackConfig, default_run_id
from bfpack_spark.io.delta import DeltaOutput, read_table
from bfpack_spark.io.inputs import InputPlan, check_output, plan_inputs
from bfpack_spark.io.lock import OutputLock
from bfpack_spark.metrics import PackingStats, bucket_labels
from bfpack_spark.packing.plan import (
    Plan,
    assign_sequences,
    pack_parts,
    plan_concat,
    residual_parts,
    route,
)
from bfpack_spark.schemas import CHUNK, COUNT, FRAGMENTS, READ, REJECT, SEQUENCES, spark_ddl
from bfpack_spark.spark.session import collect_arrow, get_spark
from bfpack_spark.stages.assemble import GroupPlan, assemble_fragments, fragments, local_sequences
from bfpack_spark.stages.read import ReadSettings, read_group
from bfpack_spark.tokenize import TokenizerError, load_tokenizer

log = logging.getLogger("bfpack")

TABLES = ("sequences", "documents", "rejects", "stats")


class AuditError(RuntimeError):
    """The written tables do not account for every input token; nothing was committed."""


@dataclass
class StageTimer:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, stage: str, announce: bool = True):
        if announce:
            log.info("stage %s ...", stage)
        t0 = time.perf_counter()
        yield
        self.seconds[stage] = round(time.perf_counter() - t0, 3)
        log.info("stage %s done in %.1fs", stage, self.seconds[stage])


@dataclass
class RunResult:
    run_id: str
    output: str
    stats: dict
    packing: PackingStats | None = None
    concat: PackingStats | None = None
    already_committed: bool = False

    def table(self, name: str) -> str:
        return f"{self.output.rstrip('/')}/{name}"


@dataclass
class _Docs:
    """Every document that became chunks, in canonical order, as driver-side arrays."""

    group: np.ndarray
    index: np.ndarray
    tokens: np.ndarray


def _partition_table(batches) -> pa.Table | None:
    batches = list(batches)
    return pa.Table.from_batches(batches) if batches else None


def _per_group(table: pa.Table):
    groups = table.column("group").to_numpy()
    for g in np.unique(groups):
        yield int(g), table.filter(pa.array(groups == g))


def _read_stage(spark: SparkSession, config: PackConfig, inputs: InputPlan) -> DataFrame:
    settings = ReadSettings(
        id_column=config.input.id_column or None,
        column=config.input.token_column or config.input.text_column,
        tokenized=config.tokenized,
        tokenizer=config.tokenizer.tokenizer,
        eos_token=config.tokenizer.eos_token,
        append_eos=config.append_eos,
        seq_len=config.packing.seq_len,
        keep_empty=config.quality.empty_documents == "keep",
        max_document_bytes=config.quality.max_document_bytes,
    )
    groups = inputs.groups

    def read(batches):
        for batch in batches:
            for g in batch.column(0).to_pylist():
                yield from read_group(g, groups[g], settings)

    n = len(groups)
    return spark.range(0, n, 1, n).mapInArrow(read, spark_ddl(READ))


def _resolve_duplicates(first_chunks: DataFrame, policy: str, run_id: str) -> tuple[list[tuple[int, int]], list[dict]]:
    """(group, doc_index) of documents to drop as duplicates, and their reject records."""
    if policy == "keep":
        return [], []
    dup_ids = first_chunks.groupBy("doc_id").count().filter("count > 1").select("doc_id")
    rows = collect_arrow(first_chunks.join(dup_ids, "doc_id").select("doc_id", "group", "doc_index",
                                                                     "source", "row"))
    if rows.num_rows == 0:
        return [], []
    rows = rows.sort_by([("doc_id", "ascending"), ("group", "ascending"), ("doc_index", "ascending")])
    drop, rejects, first = [], [], None
    for r in rows.to_pylist():
        if first is None or first["doc_id"] != r["doc_id"]:
            first = r
            continue
        drop.append((r["group"], r["doc_index"]))
        rejects.append({"run_id": run_id, "source": r["source"], "row": r["row"], "doc_id": r["doc_id"],
                        "reason": f"duplicate id; first seen in {first['source']} at row {first['row']}",
                        "excerpt": ""})
    return drop, rejects


def _collect_docs(first_chunks: DataFrame) -> _Docs:
    table = collect_arrow(first_chunks.select("group", "doc_index", "doc_tokens"))
    table = table.sort_by([("group", "ascending"), ("doc_index", "ascending")])
    return _Docs(table.column("group").to_numpy().astype(np.int64),
                 table.column("doc_index").to_numpy().astype(np.int64),
                 table.column("doc_tokens").to_numpy().astype(np.int64))


def _pack_on_spark(spark: SparkSession, item: np.ndarray, part: np.ndarray, length: np.ndarray,
                   n_parts: int, seq_len: int, fill: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pack_parts` run by Spark: items shuffled by part (lengths only), BFD in each task."""
    if item.shape[0] == 0:
        return np.empty(0, np.int64), np.empty(0, np.bool_)

    def pack(batches):
        table = _partition_table(batches)
        if table is None:
            return
        table = table.sort_by("item")
        bins, final = pack_parts(table.column("part").to_numpy(), table.column("length").to_numpy(),
                                 seq_len, fill)
        yield pa.RecordBatch.from_arrays([table.column("item").combine_chunks(), pa.array(bins),
                                          pa.array(final)], names=["item", "bin", "final"])

    items = spark.createDataFrame(pd.DataFrame({"item": item, "part": part, "length": length}))
    packed = collect_arrow(items.repartition(n_parts, "part")
                           .mapInArrow(pack, "item bigint, bin bigint, final boolean")).sort_by("item")
    return packed.column("bin").to_numpy(), packed.column("final").to_numpy(zero_copy_only=False)


def _plan_bfd(spark: SparkSession, docs: _Docs, n_groups: int, n_parts: int, config: PackConfig) -> Plan:
    """Best-fit plan: chunks dealt to partitions (driver), BFD per partition in Spark tasks, then
    the residual merge in a final reduce of one or more length-stratified partitions."""
    L, p = config.packing.seq_len, config.packing
    items = route(docs.tokens, docs.group, n_groups, L, n_parts, p.placement)
    bins, final = _pack_on_spark(spark, np.arange(items.length.shape[0]), items.part, items.length,
                                 n_parts, L, p.residual_fill)
    left = np.flatnonzero(~final)
    n_reduce = max(1, math.ceil(left.shape[0] / p.merge_items_per_partition))
    rpart = residual_parts(items.length[left], L, n_reduce)
    rbins, _ = _pack_on_spark(spark, left, rpart, items.length[left], n_reduce, L, 0.0)
    return assign_sequences(items, bins, final, rpart, rbins, docs.group)


def _assemble(spark: SparkSession, chunks: DataFrame, plan: Plan, docs: _Docs, n_groups: int,
              run_id: str, merge_items: int) -> tuple[DataFrame, list]:
    """The sequences DataFrame, and the broadcasts it reads (to release once it is written).

    One broadcast per group: a task loads only its own group's slice of the plan.
    """
    group_plans = [spark.sparkContext.broadcast(p) for p in GroupPlan.split(plan, docs.group, docs.index, n_groups)]

    def build_local(batches):
        table = _partition_table(batches)
        if table is not None:
            for g, rows in _per_group(table):
                yield from local_sequences(rows, group_plans[g].value, run_id)

    def build_fragments(batches):
        table = _partition_table(batches)
        if table is not None:
            for g, rows in _per_group(table):
                yield from fragments(rows, group_plans[g].value)

    def join_fragments(batches):
        table = _partition_table(batches)
        if table is not None:
            yield from assemble_fragments(table, run_id)

    local = chunks.mapInArrow(build_local, spark_ddl(SEQUENCES))
    moving = ~plan.local
    if not moving.any():
        return local, group_plans
    movers = np.unique(np.stack([docs.group[plan.doc[moving]], docs.index[plan.doc[moving]]]), axis=1)
    source = chunks
    if movers.shape[1] < 0.5 * docs.group.shape[0]:  # send only documents with moving segments
        keys = spark.createDataFrame(pd.DataFrame({"group": movers[0].astype(np.int32),
                                                   "doc_index": movers[1]}))
        source = chunks.join(F.broadcast(keys), ["group", "doc_index"], "left_semi")
    n_reduce = max(1, math.ceil(int(moving.sum()) / merge_items))
    merged = (source.mapInArrow(build_fragments, spark_ddl(FRAGMENTS))
              .repartition(n_reduce, "seq_id")
              .mapInArrow(join_fragments, spark_ddl(SEQUENCES)))
    return local.unionByName(merged), group_plans


def _packing_stats(plan: Plan, lengths: np.ndarray, seq_len: int) -> PackingStats:
    pieces = np.bincount(plan.doc, minlength=lengths.shape[0])
    return PackingStats.from_pieces(lengths, pieces, plan.n_sequences, seq_len)


def _hash31(*cols) -> F.Column:
    return F.pmod(F.xxhash64(*cols), F.lit(2**31)).cast("decimal(38,0)")


def _checksum(*cols) -> F.Column:
    """An order-free fingerprint of a set of rows: the exact sum of a 31-bit hash of each."""
    return F.sum(_hash31(*cols))


def _weighted(key, amount) -> F.Column:
    """Sum of ``amount`` weighted by a hash of ``key``: equal on both sides iff per-key sums agree
    (up to hash collisions)."""
    return F.sum(_hash31(key) * amount.cast("decimal(38,0)"))


def _audit(spark: SparkSession, staged: dict, expect: dict, seq_len: int, chunked: bool) -> dict:
    """Figures of the staged files against what the plan and the read stage promise.

    Only global aggregations (no shuffle): per-document conservation is checked with
    checksums of (document, length) and (document, offset) pairs on both sides.
    """
    def staged_df(name):
        s = staged[name]
        return spark.read.parquet(f"{s.uri.rstrip('/')}/{s.directory}")

    seqs = staged_df("sequences")
    segs = seqs.select(F.explode(F.arrays_zip("doc_ids", "seg_starts", "seg_lengths")).alias("s"))
    seg_sums = segs.agg(
        F.count("*").alias("segments"),
        F.coalesce(_weighted(F.col("s.doc_ids"), F.col("s.seg_lengths")), F.lit(0)).alias("doc_lengths"),
        F.coalesce(_checksum(F.col("s.doc_ids"), F.col("s.seg_starts")), F.lit(0)).alias("doc_starts"),
    ).first().asDict()
    n = F.col("seq_id").cast("decimal(38,0)")
    row = seqs.agg(
        F.count("*").alias("sequences"),
        F.coalesce(F.sum("n_tokens"), F.lit(0)).alias("tokens"),
        F.coalesce(F.max("n_tokens"), F.lit(0)).alias("max_tokens"),
        F.coalesce(F.sum(F.when((F.size("input_ids") != F.col("n_tokens"))
                                | (F.aggregate("seg_lengths", F.lit(0), lambda a, x: a + x) != F.col("n_tokens"))
                                | (F.size("doc_ids") != F.size("seg_lengths")), 1).otherwise(0)),
                   F.lit(0)).alias("inconsistent"),
        F.coalesce(F.sum(n), F.lit(0)).alias("id_sum"),
        F.coalesce(F.sum(n * n), F.lit(0)).alias("id_square_sum"),
    ).first().asDict()
    docs = staged_df("documents")
    chunk_starts = F.explode(F.sequence(F.lit(0), (F.col("n_chunks") - 1) * seq_len, F.lit(seq_len)))
    doc_sums = docs.agg(
        F.count("*").alias("documents"),
        F.coalesce(_weighted(F.col("doc_id"), F.col("n_tokens")), F.lit(0)).alias("doc_lengths"),
    ).first().asDict()
    doc_starts = (docs.filter("n_chunks > 0").select("doc_id", chunk_starts.alias("start"))
                  .agg(F.coalesce(_checksum("doc_id", "start"), F.lit(0))).first()[0])
    k = expect["sequences"]
    found = {
        "sequences": row["sequences"], "tokens": row["tokens"], "segments": seg_sums["segments"],
        "max_sequence_tokens": row["max_tokens"], "inconsistent_rows": row["inconsistent"],
        "documents": doc_sums["documents"], "rejects": staged_df("rejects").count(),
    }
    checks = {
        "sequences match the plan": found["sequences"] == k,
        "seq_id is 0..sequences-1, each once": row["id_sum"] == k * (k - 1) // 2
        and row["id_square_sum"] == (k - 1) * k * (2 * k - 1) // 6,
        "tokens in sequences = tokens of packed documents": found["tokens"] == expect["tokens"],
        "no sequence above seq_len": found["max_sequence_tokens"] <= seq_len,
        "rows consistent (n_tokens, segments)": found["inconsistent_rows"] == 0,
        "each document's tokens in sequences = its length": seg_sums["doc_lengths"] == doc_sums["doc_lengths"],
        "segments match the plan": found["segments"] == expect["segments"],
        "documents read = packed + rejected": expect["documents_read"] == found["documents"]
        + expect["documents_rejected"],
        "documents written": found["documents"] == expect["documents"],
        "rejects written": found["rejects"] == expect["rejects"],
    }
    if chunked:
        checks["every chunk in exactly one sequence"] = seg_sums["doc_starts"] == doc_starts
    return {"passed": all(checks.values()), "checks": checks, "found": found, "expected": expect}


def run(config: PackConfig, spark: SparkSession | None = None) -> RunResult:
    """Pack the configured corpus into the Delta tables under ``config.output.output``."""
    config.validate()
    timer = StageTimer()
    started = datetime.now(UTC)
    L = config.packing.seq_len
    with timer("plan inputs", announce=False):  # a mistake found here is the only line printed
        tokenizer = load_tokenizer(config.tokenizer.tokenizer, config.tokenizer.eos_token)  # fail before Spark
        if config.append_eos and tokenizer.eos_id is None:
            raise TokenizerError(f"{tokenizer.name} has no end-of-document token; name one with --eos-token "
                                 f"or turn it off with --no-append-eos")
        inputs = plan_inputs(config.input.paths, config.input.format,
                             config.input.token_column or config.input.text_column, config.tokenized,
                             L, config.input.target_items_per_partition, config.input.min_partitions,
                             config.input.id_column or None)
        check_output(config.output.output)
    run_id = config.output.run_id or default_run_id(config, inputs.listing())
    log.info("run %s: %d input files in %d groups", run_id, len(inputs.files), len(inputs.groups))
    spark = spark or get_spark(config.spark.master, config.spark.app_name, config.spark.conf)
    with OutputLock(config.output.output, run_id) as lock:
        output = DeltaOutput(spark, config.output.output, run_id, config.output.mode,
                             config.output.delta_writer)
        if config.output.mode == "append" and output.committed("stats"):  # stats is committed last
            log.info("run %s is already in every table of %s; nothing to do", run_id, config.output.output)
            stats = (read_table(spark, output.table_uri("stats")).filter(F.col("run_id") == run_id)
                     .first().asDict())
            return RunResult(run_id, config.output.output, stats, already_committed=True)
        read_df = _read_stage(spark, config, inputs).persist(StorageLevel.MEMORY_AND_DISK)
        try:
            return _run(spark, config, inputs, read_df, output, run_id, timer, started, lock.held)
        except BaseException:
            output.discard()
            raise
        finally:
            read_df.unpersist()


def _run(spark, config, inputs, read_df, output, run_id, timer, started, locked) -> RunResult:
    L = config.packing.seq_len
    first_chunks = read_df.filter((F.col("kind") == CHUNK) & (F.col("chunk") == 0))
    with timer("read"):
        counts = {r["kind"]: (r["rows"], r["records"]) for r in read_df.groupBy("kind").agg(
            F.count("*").alias("rows"), F.sum("row").alias("records")).collect()}
        n_read_rejects = counts.get(REJECT, (0, 0))[0]
        documents_read = int(counts.get(COUNT, (0, 0))[1] or 0)  # counted by the readers themselves
        drop, dup_rejects = _resolve_duplicates(first_chunks, config.quality.duplicate_ids, run_id)
        docs = _collect_docs(first_chunks)
    n_groups = len(inputs.groups)
    if drop:
        dropped = np.zeros(docs.group.shape[0], bool)
        key = docs.group * (1 << 40) + docs.index
        dropped[np.isin(key, [g * (1 << 40) + i for g, i in drop])] = True
        docs = _Docs(docs.group[~dropped], docs.index[~dropped], docs.tokens[~dropped])
    rejected = len(drop) + n_read_rejects
    log.info("read %d documents (%d tokens), %d rejected", documents_read, int(docs.tokens.sum()), rejected)
    if documents_read and rejected / documents_read > config.quality.max_reject_fraction:
        raise AuditError(f"{rejected} of {documents_read} documents rejected, more than "
                         f"quality.max_reject_fraction={config.quality.max_reject_fraction}; see the "
                         f"reasons with --max-reject-fraction 1 and the rejects table")

    with timer("plan"):
        faults.check("plan")
        n_parts = config.packing.partitions or n_groups
        concat_plan = plan_concat(docs.tokens, docs.group, L)
        if config.packing.strategy == "bfd":
            plan = _plan_bfd(spark, docs, n_groups, n_parts, config)
        else:
            plan = concat_plan
        packing = _packing_stats(plan, docs.tokens, L)
        concat = _packing_stats(concat_plan, docs.tokens, L)
        moved = ~plan.local
        log.info("plan: %d sequences (lower bound %d), %d segments, %.2f%% of tokens move",
                 plan.n_sequences, packing.lower_bound, plan.doc.shape[0],
                 100 * plan.length[moved].sum() / max(1, plan.length.sum()))

    chunks = read_df.filter(F.col("kind") == CHUNK)
    if drop:
        dropped_df = spark.createDataFrame([(int(g), int(i)) for g, i in drop], "group int, doc_index bigint")
        chunks = chunks.join(F.broadcast(dropped_df), ["group", "doc_index"], "left_anti")
        first_chunks = first_chunks.join(F.broadcast(dropped_df), ["group", "doc_index"], "left_anti")
    staged = {}
    with timer("assemble and write sequences"):
        sequences, broadcasts = _assemble(spark, chunks, plan, docs, n_groups, run_id,
                                          config.packing.merge_items_per_partition)
        staged["sequences"] = output.stage("sequences", sequences, sort_by="seq_id")
        for b in broadcasts:
            b.destroy()
    with timer("write documents and rejects"):
        documents = first_chunks.select(
            "doc_id", F.col("doc_tokens").alias("n_tokens"),
            F.ceil(F.col("doc_tokens") / L).cast("int").alias("n_chunks"),
            "source", "row", F.lit(run_id).alias("run_id"))
        staged["documents"] = output.stage("documents", documents)
        rejects = read_df.filter(F.col("kind") == REJECT).select(
            F.lit(run_id).alias("run_id"), "source", "row", "doc_id", "reason", "excerpt")
        if dup_rejects:
            rejects = rejects.unionByName(spark.createDataFrame(dup_rejects, rejects.schema))
        staged["rejects"] = output.stage("rejects", rejects)

    faults.check("staged")
    with timer("audit"):
        audit = _audit(spark, staged, {
            "sequences": plan.n_sequences, "tokens": int(docs.tokens.sum()), "segments": int(plan.doc.shape[0]),
            "documents": int(docs.group.shape[0]), "documents_read": documents_read,
            "documents_rejected": rejected, "rejects": rejected,
        }, L, chunked=config.packing.strategy == "bfd")
        if not audit["passed"]:
            failed = [name for name, ok in audit["checks"].items() if not ok]
            raise AuditError(f"audit failed, nothing committed: {'; '.join(failed)} "
                             f"(found {audit['found']}, expected {audit['expected']})")

    stats = _stats_row(config, run_id, inputs, started, documents_read, rejected, plan, packing, concat,
                       n_parts, audit, timer)
    staged["stats"] = output.stage("stats", spark.createDataFrame([stats], _STATS_DDL))
    with timer("commit"):
        for name in ("rejects", "documents", "sequences", "stats"):
            faults.check(f"commit:{name}")
            output.commit(staged[name])
        for name in TABLES:
            output.clean_orphans(name, any_run=locked)
    stats["stage_seconds"] = dict(timer.seconds)
    return RunResult(run_id, config.output.output, stats, packing, concat)


_STATS_DDL = (
    "run_id string, started_at string, mode string, strategy string, placement string, seq_len int, "
    "config string, input_files int, input_groups int, packing_partitions int, "
    "documents_read bigint, documents_packed bigint, documents_rejected bigint, tokens bigint, "
    "chunks bigint, sequences bigint, lower_bound bigint, overhead bigint, overhead_fraction double, "
    "padding_tokens bigint, mean_fill double, truncations_per_document double, documents_truncated bigint, "
    "concat_sequences bigint, concat_truncations_per_document double, concat_documents_truncated bigint, "
    "truncations_by_length string, residual_items bigint, residual_sequences bigint, "
    "moved_segments bigint, moved_tokens bigint, audit_passed boolean, audit string, "
    "stage_seconds map<string,double>"
)


def _stats_row(config, run_id, inputs, started, documents_read, rejected, plan, packing, concat,
               n_parts, audit, timer) -> dict:
    moved = ~plan.local
    by_length = [
        {"length": label, "documents": d, "truncations_per_document": (t / d) if d else 0.0,
         "concat_truncations_per_document": (c / d) if d else 0.0}
        for label, d, t, c in zip(bucket_labels(), packing.bucket_documents, packing.bucket_truncations,
                                  concat.bucket_truncations) if d
    ]
    return {
        "run_id": run_id, "started_at": started.isoformat(), "mode": config.output.mode,
        "strategy": config.packing.strategy, "placement": config.packing.placement,
        "seq_len": config.packing.seq_len, "config": json.dumps(config.to_dict(), sort_keys=True),
        "input_files": len(inputs.files), "input_groups": len(inputs.groups), "packing_partitions": n_parts,
        "documents_read": documents_read, "documents_packed": packing.n_documents,
        "documents_rejected": rejected, "tokens": packing.n_tokens, "chunks": packing.n_segments,
        "sequences": packing.n_sequences, "lower_bound": packing.lower_bound, "overhead": packing.overhead,
        "overhead_fraction": packing.overhead_fraction, "padding_tokens": packing.padding_tokens,
        "mean_fill": packing.mean_fill, "truncations_per_document": packing.truncations_per_document,
        "documents_truncated": packing.n_documents_truncated, "concat_sequences": concat.n_sequences,
        "concat_truncations_per_document": concat.truncations_per_document,
        "concat_documents_truncated": concat.n_documents_truncated,
        "truncations_by_length": json.dumps(by_length), "residual_items": plan.residual_items,
        "residual_sequences": plan.residual_sequences, "moved_segments": int(moved.sum()),
        "moved_tokens": int(plan.length[moved].sum()), "audit_passed": audit["passed"],
        "audit": json.dumps(audit, default=int), "stage_seconds": dict(timer.seconds),
    }
