"""The packing job: a short list of stages, each in its own module, run under the output root's lock.

1. **read** (:mod:`~bfpack_spark.stages.read`): one task per input group reads and tokenizes;
   tokens go to the run's workspace, one small row per document to Spark.
2. **duplicates** (:mod:`~bfpack_spark.stages.dedup`): later copies of an id become rejects.
3. **plan** (:mod:`~bfpack_spark.stages.plan`): where every chunk goes, from lengths, in tasks.
4. **assemble** (:mod:`~bfpack_spark.stages.assemble`): one task per group writes its sequences,
   documents and rejects files; segments of mixed sequences move once, to a final reduce.
5. **audit** (:mod:`~bfpack_spark.audit`): the writers' figures against the read and the plan,
   and against every written file's footer.
6. **commit** (:mod:`~bfpack_spark.io.tables.delta`): one atomic Delta commit per table, stats last.

The driver holds aggregates only (per-group and per-partition counts, file descriptions),
never a row per document, so its memory does not grow with the corpus.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from bfpack_spark import faults
from bfpack_spark.audit import AuditError, check, read_footers
from bfpack_spark.config import PackConfig, default_run_id
from bfpack_spark.figures import add_figures
from bfpack_spark.incremental import committed_runs, unfinished_replacements
from bfpack_spark.io.formats.base import Fields, Limits
from bfpack_spark.io.listing.plan import InputPlan
from bfpack_spark.io.store.fs import join, set_storage_options
from bfpack_spark.io.store.lock import OutputLock
from bfpack_spark.io.store.retry import RetryPolicy, set_policy
from bfpack_spark.io.store.workspace import Workspace, clean_workspaces, remove_if_empty, workspace_root
from bfpack_spark.io.tables.delta import RETENTION_SECONDS, DeltaOutput, read_stats_row
from bfpack_spark.io.tables.staging import Staging
from bfpack_spark.metrics import PackingStats
from bfpack_spark.packing.plan import packing_partitions, warm_up
from bfpack_spark.schemas import TABLES
from bfpack_spark.spark.partitioning import count_retries
from bfpack_spark.spark.progress import stage_progress
from bfpack_spark.spark.session import get_spark
from bfpack_spark.stages.assemble import Assembly, assemble, reduce_partitions
from bfpack_spark.stages.dedup import earlier_documents, find_duplicates, without_duplicates
from bfpack_spark.stages.inputs import extra_column, inputs_table, plan_inputs
from bfpack_spark.stages.plan import DRIVER_ITEMS, PlanResult, plan_bfd, plan_in_place, plan_on_driver
from bfpack_spark.stages.read import ReadSettings, read_corpus
from bfpack_spark.stats import packing_stats, stats_row, stats_table

__all__ = ["AuditError", "RunResult", "run"]

log = logging.getLogger("bfpack")


@dataclass
class StageTimer:
    """Seconds per stage; while a stage runs, a progress bar over its Spark tasks (on a terminal)."""

    seconds: dict[str, float] = field(default_factory=dict)
    spark: Any = None

    @contextmanager
    def __call__(self, stage: str, announce: bool = True):
        if announce:
            log.info("stage %s ...", stage)
        t0 = time.perf_counter()
        try:
            with stage_progress(self.spark, stage):
                yield
        except Exception as exc:
            if not hasattr(exc, "bfpack_stage"):  # the innermost stage: what the error message names
                exc.bfpack_stage = stage  # type: ignore[attr-defined]
            raise
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
    nothing_new: bool = False

    def table(self, name: str) -> str:
        return join(self.output, name)


def _read_settings(config: PackConfig, n_groups: int) -> ReadSettings:
    p = config.packing
    in_place = p.strategy == "bfd" and p.partitions is None  # else the plan's first round is always routed
    fields = Fields(config.input.token_column or config.input.text_column, config.tokenized,
                    config.input.id_column or None, extra_column(config),
                    Limits(config.quality.max_document_bytes, config.quality.max_line_bytes))
    return ReadSettings(
        fields=fields, tokenizer=config.tokenizer.tokenizer, eos_token=config.tokenizer.eos_token,
        append_eos=config.append_eos, seq_len=config.packing.seq_len, length_buckets=config.packing.length_buckets,
        keep_empty=config.quality.empty_documents == "keep",
        bos_token=config.tokenizer.bos_token, prepend_bos=config.tokenizer.prepend_bos,
        loss_masks=config.loss_masks, engine=config.tokenizer.engine,
        in_place_fill=p.residual_fill if in_place else None, max_segments=p.max_segments_per_sequence,
        in_place_carry=DRIVER_ITEMS // max(n_groups, 1))


def run(config: PackConfig, spark=None) -> RunResult:
    """Pack the configured corpus into the Delta tables under ``config.output.output``."""
    config.validate()
    set_storage_options(config.output.storage_options)  # before Spark starts: its processes inherit them
    set_policy(RetryPolicy(attempts=config.output.retry_attempts, seconds=config.output.retry_seconds))
    timer = StageTimer()
    started = datetime.now(UTC).isoformat()
    with timer("plan inputs", announce=False):  # a mistake found here is the only line printed
        inputs = plan_inputs(config)
    root = config.output.output
    if not len(inputs.listing):
        if unfinished_replacements(root):
            _finish_replacements(spark, config)
        log.debug("no input file is new since the last run into %s", root)  # RunResult.nothing_new says it
        return RunResult("", root, {}, nothing_new=True)
    run_id = config.output.run_id or default_run_id(config, inputs.listing.identity())
    log.info("run %s: %d input files in %d groups", run_id, len(inputs.listing), inputs.n_groups)
    for old in sorted(set(inputs.replaces.values())):
        log.info("run %s re-packs run %s (a file of it changed) and replaces its rows", run_id, old)
    spark = spark or _spark(config)
    timer.spark = spark
    retried = count_retries(spark)
    with OutputLock(root, run_id) as lock:
        appending = config.output.mode in ("append", "incremental")
        output = DeltaOutput(spark, root, run_id, "append" if appending else "overwrite", config.output.delta_writer)
        output.check_schemas()
        if appending:
            _remove_replaced(output)
        if appending and output.committed("stats"):  # stats is committed last
            log.info("run %s is already in every table of %s; nothing to do", run_id, root)
            return RunResult(run_id, root, read_stats_row(output.table_uri("stats"), run_id),
                             already_committed=True)
        try:
            result = _pack(spark, config, inputs, output, timer, started, retried)
        except BaseException:
            output.discard()
            if config.output.work_dir is None:
                remove_if_empty(workspace_root(root, None))
            raise
        if appending:
            _remove_replaced(output)
        for name in TABLES:
            output.clean_orphans(name, any_run=lock.held)
        # under the output root, the lock says no run is reading a workspace; elsewhere, wait a week
        shared = config.output.work_dir is not None
        work = workspace_root(root, config.output.work_dir)
        clean_workspaces(work, output.attempt, run_id, lock.held, time.time() - (RETENTION_SECONDS if shared else 0))
        if not shared:
            remove_if_empty(work)
        result.stats["requests_retried"] = retried()  # the commits' too
        return result


def _spark(config: PackConfig):
    return get_spark(config.spark.master, config.spark.app_name, config.spark.conf, config.spark.task_attempts)


def _remove_replaced(output: DeltaOutput) -> None:
    """Remove the rows of every run that a committed run replaced (under the output root's lock)."""
    for old, new in sorted(unfinished_replacements(output.root).items()):
        output.remove_run(old, new)


def _finish_replacements(spark, config: PackConfig) -> None:
    """Nothing new to pack, but a run stopped before removing the rows it replaced: remove them."""
    spark = spark or _spark(config)
    with OutputLock(config.output.output, "replacements"):
        _remove_replaced(DeltaOutput(spark, config.output.output, "replacements", "append",
                                     config.output.delta_writer))


@dataclass
class _Run:
    """What the stages of one run share: where they write, and what they cache (released at the end)."""

    spark: Any
    config: PackConfig
    inputs: InputPlan
    output: DeltaOutput
    timer: StageTimer
    release: ExitStack
    staging: Staging = field(init=False)
    workspace: Workspace = field(init=False)

    def __post_init__(self) -> None:
        root = self.config.output.output
        self.staging = Staging(root, self.output.attempt, self.output.run_id)
        self.workspace = Workspace(join(workspace_root(root, self.config.output.work_dir), self.output.attempt))
        self.release.callback(self.workspace.remove)


@dataclass(frozen=True)
class _Counts:
    """What the read and the duplicates leave to pack: documents read, rejected, tokens per group."""

    documents_read: int
    rejected: int
    tokens_by_group: np.ndarray

    @property
    def tokens(self) -> int:
        return int(self.tokens_by_group.sum())


def _pack(spark, config: PackConfig, inputs: InputPlan, output: DeltaOutput, timer: StageTimer,
          started: str, retried) -> RunResult:
    """The stages, in order; nothing is committed before the audit passes."""
    with ExitStack() as release:
        run = _Run(spark, config, inputs, output, timer, release)
        read = _read(run)
        dups, counts = _duplicates(run, read)
        plan = _plan(run, read, dups, counts)
        files, figures = _assemble(run, read, dups, plan, counts)
        packing, concat = packing_stats(figures, config.packing.strategy, plan.n_sequences, config.packing.seq_len)
        audit = _audit(run, files, read, dups, plan, counts, concat)
        stats = stats_row(run_id=output.run_id, started=started, config=config, inputs=inputs,
                          documents_read=counts.documents_read, rejected=counts.rejected, packing=packing,
                          concat=concat, plan=plan, moved=_moved(figures), audit=audit,
                          stage_seconds=timer.seconds, written=add_figures(f.figures for f in files["sequences"]),
                          requests_retried=retried(), engine=read.engines())
        _commit(run, files, stats)
    stats["stage_seconds"] = dict(timer.seconds)
    return RunResult(output.run_id, config.output.output, stats, packing, concat)


def _warm_up() -> None:
    try:
        warm_up()
    except Exception:  # the plan loads the kernels itself, and reports what fails there
        log.debug("loading the plan's kernels ahead failed", exc_info=True)


def _read(run: _Run):
    if run.config.packing.strategy == "bfd":  # the plan's kernels load while the read runs
        threading.Thread(target=_warm_up, name="bfpack-warm-up", daemon=True).start()
    with run.timer("read"):
        settings = _read_settings(run.config, run.inputs.n_groups)
        read = read_corpus(run.spark, run.inputs, settings, run.staging, run.workspace)
        run.release.callback(read.rows.unpersist)
    return read


def _duplicates(run: _Run, read):
    """Later copies of an id (also of ids earlier runs packed, when appending) become rejects; too many
    rejects end the run before anything is planned."""
    config = run.config
    with run.timer("duplicates"):
        earlier = None
        if config.output.mode != "overwrite" and config.quality.duplicate_ids == "skip":
            runs = committed_runs(run.output.root) - set(run.inputs.replaces.values())  # not the runs re-packed
            earlier = earlier_documents(run.spark, run.output.table_uri("documents"), sorted(runs), read.docs)
        dups = find_duplicates(read.docs, config.quality.duplicate_ids, config.packing.seq_len,
                               config.packing.length_buckets, earlier)
        run.release.callback(dups.unpersist)
    counts = _Counts(read.total("records"), read.total("rejects") + dups.count,
                     np.array([g["tokens"] - dups.tokens_by_group.get(i, 0) for i, g in enumerate(read.groups)],
                              np.int64))
    log.info("read %s documents (%s tokens packable), %s rejected", f"{counts.documents_read:,}",
             f"{counts.tokens:,}", f"{counts.rejected:,}")
    limit = config.quality.max_reject_fraction
    if counts.documents_read and counts.rejected / counts.documents_read > limit:
        raise AuditError(f"{counts.rejected:,} of {counts.documents_read:,} documents rejected ({dups.count:,} of "
                         f"them duplicate ids), more than quality.max_reject_fraction={limit}; to see why, run "
                         f"with --max-reject-fraction 1 into a scratch --output and `bfpack report` it")
    return dups, counts


def _plan(run: _Run, read, dups, counts: _Counts) -> PlanResult:
    p, n_groups, L = run.config.packing, run.inputs.n_groups, run.config.packing.seq_len
    with run.timer("plan"):
        faults.check("plan")
        if p.strategy == "bfd":
            items = np.array([g["items"] for g in read.groups], np.int64).reshape(n_groups, -1)
            for g, dropped in dups.items_by_group.items():
                items[g] -= dropped
            n_parts = packing_partitions(int(items.sum()), n_groups, p.merge_items_per_partition, p.partitions)
            plan = None
            if not dups.items_by_group and all("in_place" in g for g in read.groups):  # the read's work holds
                plan = (plan_on_driver(run.spark, read.groups, L, p.length_buckets, p.max_segments_per_sequence)
                        if n_parts == 1 else
                        plan_in_place(read.residue, read.groups, counts.tokens, L, p.residual_fill,
                                      p.merge_items_per_partition, p.length_buckets, p.max_segments_per_sequence))
            if plan is None:
                kept = without_duplicates(read.docs, dups, n_groups)
                run.release.callback(kept.unpersist)
                plan = plan_bfd(kept, items, L, n_parts, p.residual_fill, p.merge_items_per_partition,
                                p.length_buckets, p.max_segments_per_sequence)
            run.release.callback(plan.unpersist)
            for g in read.groups:  # the lengths and residue handed over: planned now
                g.pop("in_place", None)
        else:
            plan = PlanResult(None, -(-counts.tokens // L), n_groups)
        log.info("plan: %d sequences (lower bound %d), round 0 %s, %d residual items, %d merge rounds",
                 plan.n_sequences, -(-counts.tokens // L), plan.first_round, plan.residual_items, plan.merge_rounds)
    return plan


def _assemble(run: _Run, read, dups, plan: PlanResult, counts: _Counts) -> tuple[dict[str, list], list[dict]]:
    """The tables' files as the tasks wrote them, and the assembly's figures."""
    config, p = run.config, run.config.packing
    with run.timer("assemble and write"):
        ctx = Assembly(p.seq_len, p.strategy, run.staging, run.workspace, config.tokenizer.tokenizer,
                       config.tokenizer.eos_token, np.cumsum(counts.tokens_by_group) - counts.tokens_by_group,
                       counts.tokens, tuple(plan.first_ids), config.tokenizer.bos_token, config.loss_masks,
                       p.max_segments_per_sequence, p.residual_fill if plan.in_place else None)
        assembled = assemble(run.spark, plan.orders, dups.drops, run.inputs.n_groups, ctx,
                             reduce_partitions(plan.moved_segments, plan.moved_tokens, p.merge_items_per_partition))
    faults.check("staged")
    return {name: [f for f in read.files + assembled.files if f.table == name] for name in TABLES}, assembled.figures


def _audit(run: _Run, files: dict[str, list], read, dups, plan: PlanResult, counts: _Counts,
           concat: PackingStats):
    p = run.config.packing
    with run.timer("audit"):
        written = [f for name in ("sequences", "documents", "rejects") for f in files[name]]
        audit = check(files, read_footers(run.spark, run.staging, written), {
            "sequences": plan.n_sequences, "tokens": counts.tokens,
            "segments": plan.n_items if p.strategy == "bfd" else concat.n_segments,
            "documents": read.total("documents") - dups.count, "documents_read": counts.documents_read,
            "documents_rejected": counts.rejected}, p.seq_len, chunked=p.strategy == "bfd",
            loss_masks=run.config.loss_masks, max_segments=p.max_segments_per_sequence)
        audit.raise_if_failed()
    return audit


def _commit(run: _Run, files: dict[str, list], stats: dict) -> None:
    """One Delta commit per table, ``stats`` last (a run is committed when its stats row is)."""
    files["stats"] = [run.staging.write("stats", "stats", stats_table(stats))]
    files["inputs"] = [run.staging.write("inputs", "inputs", inputs_table(run.output.run_id, run.inputs))]
    with run.timer("commit"):
        for name in ("rejects", "documents", "sequences", "inputs", "stats"):
            faults.check(f"commit:{name}")
            run.output.commit(name, files[name])


def _moved(figures: list[dict]) -> tuple[int, int]:
    """Segments and tokens that moved to the final reduce."""
    return sum(f["moved_segments"] for f in figures), sum(f["moved_tokens"] for f in figures)
