"""The packing job: a short list of stages, each in its own module, run while the output root is held.

0. **inputs** (:mod:`~bfpack_spark.stages.inputs`): the input files listed and cut into groups
   (an :class:`~bfpack_spark.io.listing.plan.InputPlan`); no file is read.
1. **read** (:mod:`~bfpack_spark.stages.read`): one task per group reads and tokenizes;
   tokens go to the run's workspace, one small row per document to Spark (a ``ReadResult``).
2. **duplicates** (:mod:`~bfpack_spark.stages.dedup`): later copies of an id become rejects (``Duplicates``).
3. **plan** (:mod:`~bfpack_spark.stages.plan`): where every chunk goes, from lengths (a ``PlanResult``).
4. **assemble** (:mod:`~bfpack_spark.stages.assemble`): one task per group writes its sequences,
   documents and rejects files; segments of mixed sequences move once, to a final reduce.
5. **audit** (:mod:`~bfpack_spark.audit`): the writers' figures against the read and the plan,
   and against every written file's footer.
6. **commit** (:mod:`~bfpack_spark.io.tables.delta`): one atomic Delta commit per table, stats last.

The output root (:mod:`~bfpack_spark.stages.output`) owns the lock, what an earlier attempt
committed, and the clean-up. The driver holds aggregates only (per-group and per-partition
counts, the input listing), never a row per document, so its memory does not grow with the corpus.
"""

from __future__ import annotations

import logging
import threading
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from bfpack_spark import faults
from bfpack_spark.audit import AuditError, check, read_footers
from bfpack_spark.config import PackConfig, default_run_id
from bfpack_spark.incremental import committed_runs
from bfpack_spark.io.listing.plan import InputPlan
from bfpack_spark.io.store.fs import join, set_storage_options
from bfpack_spark.io.store.retry import RetryPolicy, set_policy
from bfpack_spark.io.store.workspace import Workspace
from bfpack_spark.io.tables.staging import Staging
from bfpack_spark.packing.plan import warm_up
from bfpack_spark.schemas import TABLES, stats_table
from bfpack_spark.spark.partitioning import count_retries
from bfpack_spark.spark.progress import Counters, StageTimer
from bfpack_spark.spark.session import get_spark
from bfpack_spark.stages.assemble import Assembly, assemble, reduce_partitions
from bfpack_spark.stages.dedup import Duplicates, earlier_documents, find_duplicates
from bfpack_spark.stages.inputs import engine_line, inputs_table, plan_inputs
from bfpack_spark.stages.output import OutputRoot, check_root, finish_replacements
from bfpack_spark.stages.plan import in_place_settings, make_plan
from bfpack_spark.stages.read import ReadResult, ReadSettings, read_corpus
from bfpack_spark.stages.resume import duplicates_key, found_none_before, record_none_found, replay_read
from bfpack_spark.stages.rounds import PlanResult
from bfpack_spark.stats.figures import add_figures
from bfpack_spark.stats.packing import PackingStats
from bfpack_spark.stats.row import packing_stats, stats_row

__all__ = ["AuditError", "RunResult", "run"]

log = logging.getLogger("bfpack")


@dataclass
class RunResult:
    run_id: str
    output: str
    stats: dict
    packing: PackingStats | None = None
    concat: PackingStats | None = None
    already_committed: bool = False
    nothing_new: bool = False

    def table(self, name: str) -> str:
        return join(self.output, name)


def run(config: PackConfig, spark=None) -> RunResult:
    """Pack the configured corpus into the Delta tables under ``config.output.output``."""
    config.validate()
    set_storage_options(config.output.storage_options)  # before Spark starts: its processes inherit them
    set_policy(RetryPolicy(attempts=config.output.retry_attempts, seconds=config.output.retry_seconds))
    timer = StageTimer(log_every=config.spark.progress_seconds)
    started = datetime.now(UTC).isoformat()
    with timer("plan inputs", announce=False):  # a mistake found here is the only line printed
        inputs = plan_inputs(config)
        key = default_run_id(config, inputs.listing.identity())  # what the files and settings make the run
        run_id = config.output.run_id or key
        if len(inputs.listing):
            check_root(config, run_id)
    if not config.tokenized:
        log.info("%s", engine_line(config))
    root = config.output.output
    if not len(inputs.listing):
        finish_replacements(config, lambda: spark or _spark(config))
        log.debug("no input file is new since the last run into %s", root)  # RunResult.nothing_new says it
        return RunResult("", root, {}, nothing_new=True)
    log.info("run %s: %d input files in %d groups", run_id, len(inputs.listing), inputs.n_groups)
    for old in sorted(set(inputs.replaces.values())):
        log.info("run %s re-packs run %s (a file of it changed) and replaces its rows", run_id, old)
    if config.packing.strategy == "bfd":  # the plan's kernels load while Spark starts and the read runs
        threading.Thread(target=_warm_up, name="bfpack-warm-up", daemon=True).start()
    spark = timer.spark = spark or _spark(config)
    retried = count_retries(spark)
    with OutputRoot(spark, config, run_id) as held:
        if (committed := held.committed_stats()) is not None:
            log.info("run %s is already in every table of %s; nothing to do", run_id, root)
            return RunResult(run_id, root, committed, already_committed=True)
        held.prepare_workspace({"run_id": run_id, "key": key, "fingerprint": config.fingerprint(),
                                "files": len(inputs.listing), "started": started})
        result = _pack(_Run(spark, config, inputs, held, timer), started, retried)
    result.stats["requests_retried"] = retried()  # the commits' too
    return result


def _spark(config: PackConfig):
    return get_spark(config.spark.master, config.spark.app_name, config.spark.conf, config.spark.task_attempts)


@dataclass
class _Run:
    """What the stages of one run share: where they write, and what they cache (released at the end)."""

    spark: Any
    config: PackConfig
    inputs: InputPlan
    root: OutputRoot
    timer: StageTimer
    release: ExitStack = field(default_factory=ExitStack)
    staging: Staging = field(init=False)
    workspace: Workspace = field(init=False)

    def __post_init__(self) -> None:
        output = self.root.output
        self.staging = Staging(output.root, output.folder, output.run_id)
        self.workspace = self.root.workspace


@dataclass(frozen=True)
class _Counts:
    """What the read and the duplicates leave to pack: documents read, rejected, tokens per group."""

    documents_read: int
    rejected: int
    tokens_by_group: np.ndarray

    @property
    def tokens(self) -> int:
        return int(self.tokens_by_group.sum())


def _pack(run: _Run, started: str, retried) -> RunResult:
    """The stages, in order; nothing is committed before the audit passes."""
    config, output = run.config, run.root.output
    with run.release:
        read = _read(run)
        dups, counts = _duplicates(run, read)
        plan = _plan(run, read, dups, counts)
        files, figures = _assemble(run, read, dups, plan, counts)
        packing, concat = packing_stats(figures, config.packing.strategy, plan.n_sequences, config.packing.seq_len)
        audit = _audit(run, files, read, dups, plan, counts, concat)
        stats = stats_row(run_id=output.run_id, started=started, config=config, inputs=run.inputs,
                          documents_read=counts.documents_read, rejected=counts.rejected, packing=packing,
                          concat=concat, plan=plan, moved=_moved(figures), audit=audit,
                          stage_seconds=run.timer.seconds, written=_written(files), requests_retried=retried(),
                          engine=read.engines(), resumed=(read.resumed, sum(f.get("resumed", False) for f in figures)))
        _commit(run, files, stats)
    stats["stage_seconds"] = dict(run.timer.seconds)
    return RunResult(output.run_id, config.output.output, stats, packing, concat)


def _warm_up() -> None:
    try:
        warm_up()
    except Exception:  # the plan loads the kernels itself, and reports what fails there
        log.debug("loading the plan's kernels ahead failed", exc_info=True)


def _read(run: _Run) -> ReadResult:
    counters = Counters(run.spark, total_bytes=run.inputs.listing.total_bytes())
    with run.timer("read", counters=counters):
        settings = ReadSettings.of(run.config, in_place_settings(run.config.packing, run.inputs.n_groups))
        read = (replay_read(run.spark, run.inputs, run.staging, run.workspace)
                or read_corpus(run.spark, run.inputs, settings, run.staging, run.workspace, counters=counters))
        run.release.callback(read.rows.unpersist)
    return read


def _duplicates(run: _Run, read: ReadResult) -> tuple[Duplicates, _Counts]:
    """Later copies of an id (also of ids earlier runs packed, when appending) become rejects; too many
    rejects end the run before anything is planned."""
    config = run.config
    with run.timer("duplicates"):
        earlier, runs = None, set()
        if config.output.mode in ("append", "incremental") and config.quality.duplicate_ids == "skip":
            runs = committed_runs(run.root.root) - set(run.inputs.replaces.values())  # not the runs re-packed
            earlier = earlier_documents(run.spark, run.root.output.table_uri("documents"), sorted(runs), read.docs,
                                        read.documents)
        key = duplicates_key(read.groups, config.quality.duplicate_ids, sorted(runs))
        if read.resumed == len(read.groups) and found_none_before(run.workspace, key):
            dups = Duplicates(None)
        else:
            dups = find_duplicates(read.docs, config.quality.duplicate_ids, config.packing.seq_len,
                                   config.packing.length_buckets, earlier)
            run.release.callback(dups.unpersist)
            if dups.drops is None:
                record_none_found(run.workspace, key)
    counts = _Counts(read.records, read.rejects + dups.count,
                     np.array([g.tokens - dups.tokens_by_group.get(i, 0) for i, g in enumerate(read.groups)],
                              np.int64))
    log.info("read %s documents (%s tokens packable), %s rejected", f"{counts.documents_read:,}",
             f"{counts.tokens:,}", f"{counts.rejected:,}")
    limit = config.quality.max_reject_fraction
    if counts.documents_read and counts.rejected / counts.documents_read > limit:
        raise AuditError(f"{counts.rejected:,} of {counts.documents_read:,} documents rejected ({dups.count:,} of "
                         f"them duplicate ids), more than quality.max_reject_fraction={limit}; to see why, run "
                         f"with --max-reject-fraction 1 into a scratch --output and `bfpack report` it")
    return dups, counts


def _plan(run: _Run, read: ReadResult, dups: Duplicates, counts: _Counts) -> PlanResult:
    with run.timer("plan"):
        faults.check("plan")
        plan = make_plan(read, dups, counts.tokens, run.config.packing)
        run.release.callback(plan.unpersist)
        log.info("plan: %d sequences (lower bound %d), round 0 %s, %d residual items, %d merge rounds",
                 plan.n_sequences, -(-counts.tokens // run.config.packing.seq_len), plan.first_round,
                 plan.residual_items, plan.merge_rounds)
    return plan


def _assemble(run: _Run, read: ReadResult, dups: Duplicates, plan: PlanResult,
              counts: _Counts) -> tuple[dict[str, list], list[dict]]:
    """The tables' files as the tasks wrote them, and the assembly's figures."""
    config, p = run.config, run.config.packing
    with run.timer("assemble and write"):
        ctx = Assembly(seq_len=p.seq_len, strategy=p.strategy, staging=run.staging, workspace=run.workspace,
                       tokenizer=config.tokenizer.tokenizer, eos_token=config.tokenizer.eos_token,
                       concat_offsets=np.cumsum(counts.tokens_by_group) - counts.tokens_by_group,
                       concat_total=counts.tokens, first_ids=tuple(plan.first_ids),
                       bos_token=config.tokenizer.bos_token, loss_masks=config.loss_masks,
                       max_segments=p.max_segments_per_sequence,
                       in_place_fill=p.residual_fill if plan.in_place else None)
        assembled = assemble(run.spark, plan.orders, dups.drops, ctx=ctx, n_groups=run.inputs.n_groups,
                             n_reduce=reduce_partitions(plan.moved_segments, plan.moved_tokens,
                                                        p.merge_items_per_partition))
    faults.check("staged")
    return {name: [f for f in read.files + assembled.files if f.table == name] for name in TABLES}, assembled.figures


def _audit(run: _Run, files: dict[str, list], read: ReadResult, dups: Duplicates, plan: PlanResult,
           counts: _Counts, concat: PackingStats):
    p = run.config.packing
    with run.timer("audit"):
        written = [f for name in ("sequences", "documents", "rejects") for f in files[name]]
        audit = check(files, read_footers(run.spark, run.staging, written), {
            "sequences": plan.n_sequences, "tokens": counts.tokens,
            "segments": plan.n_items if p.strategy == "bfd" else concat.n_segments,
            "documents": read.documents - dups.count, "documents_read": counts.documents_read,
            "documents_rejected": counts.rejected}, seq_len=p.seq_len, chunked=p.strategy == "bfd",
            loss_masks=run.config.loss_masks, max_segments=p.max_segments_per_sequence)
        audit.raise_if_failed()
    return audit


def _commit(run: _Run, files: dict[str, list], stats: dict) -> None:
    """One Delta commit per table, ``stats`` last (a run is committed when its stats row is)."""
    output = run.root.output
    files["stats"] = [run.staging.write("stats", "stats", stats_table(stats))]
    files["inputs"] = [run.staging.write("inputs", "inputs", inputs_table(output.run_id, run.inputs))]
    with run.timer("commit"):
        for name in ("rejects", "documents", "sequences", "inputs", "stats"):
            faults.check(f"commit:{name}")
            output.commit(name, files[name])


def _written(files: dict[str, list]) -> dict:
    """What the sequences' writers counted."""
    return add_figures(f.figures for f in files["sequences"])


def _moved(figures: list[dict]) -> tuple[int, int]:
    """Segments and tokens that moved to the final reduce."""
    return sum(f["moved_segments"] for f in figures), sum(f["moved_tokens"] for f in figures)
