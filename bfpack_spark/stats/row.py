"""The ``stats`` row of a run, from the stages' aggregates (nothing per document reaches the driver)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from bfpack_spark.stats.figures import segment_bins
from bfpack_spark.stats.packing import PackingStats, bucket_labels


def _sum(figures: list[dict], key: str, seq_len: int) -> PackingStats:
    """The sum of the groups' additive figures of one strategy (sequences are counted elsewhere)."""
    total = PackingStats(seq_len=seq_len)
    for f in figures:
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in f[key].items()}
        total += PackingStats(**fields)
    return total


def packing_stats(figures: list[dict], strategy: str, n_sequences: int,
                  seq_len: int) -> tuple[PackingStats, PackingStats]:
    """(the packing that was made, the concatenation baseline) from the assembly's figures."""
    concat = _sum(figures, "concat", seq_len)
    concat = replace(concat, n_sequences=concat.lower_bound)
    made = concat if strategy == "concat" else replace(_sum(figures, "bfd", seq_len), n_sequences=n_sequences)
    return made, concat


def stats_row(*, run_id: str, started: str, config: Any, inputs: Any, documents_read: int, rejected: int,
              packing: PackingStats, concat: PackingStats, plan: Any, moved: tuple[int, int],
              audit: Any, stage_seconds: dict[str, float], written: dict, requests_retried: int = 0,
              engine: str | None = None, resumed: tuple[int, int] = (0, 0)) -> dict:
    """One row of the ``stats`` table (columns of :data:`~bfpack_spark.schemas.STATS`).

    ``written``: the figures the sequences' writers counted (their fill and segment histograms, the
    most segments in a sequence, the tokens with loss); ``requests_retried``: object-store requests
    retried so far; ``engine``: the tokenizer engines that encoded the text (None for tokenized input);
    ``resumed``: the groups whose read, and whose assembly, an earlier attempt of the run finished.
    """
    cap = config.packing.max_segments_per_sequence
    loss = written.get("loss_tokens", 0) if config.loss_masks else None
    by_length = [
        {"length": label, "documents": d, "truncations_per_document": (t / d) if d else 0.0,
         "concat_truncations_per_document": (c / d) if d else 0.0}
        for label, d, t, c in zip(bucket_labels(), packing.bucket_documents, packing.bucket_truncations,
                                  concat.bucket_truncations) if d
    ]
    return {
        "run_id": run_id, "started_at": started, "mode": config.output.mode or "overwrite",
        "strategy": config.packing.strategy,
        "seq_len": config.packing.seq_len, "config": json.dumps(config.to_dict(), sort_keys=True),
        "input_files": len(inputs.listing), "input_groups": inputs.n_groups,
        "packing_partitions": plan.n_partitions, "documents_read": documents_read,
        "documents_packed": packing.n_documents, "documents_rejected": rejected, "tokens": packing.n_tokens,
        "chunks": packing.n_segments, "sequences": packing.n_sequences, "lower_bound": packing.lower_bound,
        "overhead": packing.overhead, "overhead_fraction": packing.overhead_fraction,
        "padding_tokens": packing.padding_tokens, "mean_fill": packing.mean_fill,
        "truncations_per_document": packing.truncations_per_document,
        "documents_truncated": packing.n_documents_truncated, "concat_sequences": concat.n_sequences,
        "concat_truncations_per_document": concat.truncations_per_document,
        "concat_documents_truncated": concat.n_documents_truncated,
        "truncations_by_length": by_length, "residual_items": plan.residual_items,
        "residual_sequences": plan.residual_sequences, "merge_rounds": plan.merge_rounds,
        "moved_segments": moved[0], "moved_tokens": moved[1],
        "fill_histogram": written.get("fill_histogram", [0] * 101),
        "segments_histogram": written.get("segments_histogram", [0] * (segment_bins(cap) + 1)),
        "audit_passed": audit.passed, "audit_checks": dict(audit.checks),
        "audit_found": {k: int(v) for k, v in audit.found.items()},
        "audit_expected": {k: int(v) for k, v in audit.expected.items()},
        "stage_seconds": dict(stage_seconds),
        "max_segments_per_sequence": cap, "most_segments": written.get("max_segments", 0),
        "loss_tokens": loss, "no_loss_tokens": None if loss is None else packing.n_tokens - loss,
        "requests_retried": requests_retried,
        "tokenizer_engine": engine,
        "plan_first_round": plan.first_round,
        "resumed_read_groups": resumed[0], "resumed_assembly_groups": resumed[1],
    }

