"""The audit: before anything is committed, show that no token was lost or doubled.

The figures every writing task computed (:mod:`bfpack_spark.stats.figures`) are added up and held
against what the read stage counted and the plan decided (:func:`check`). A Spark job then opens
the footer of every written file and compares its row count, and for sequences its count of token
values, with the writer's figures (:func:`footer_figures`), so a file that is missing, cut short or
different fails the audit without reading the data again.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa

from bfpack_spark.io.store.fs import join
from bfpack_spark.io.tables.staging import footer_figures
from bfpack_spark.spark.partitioning import map_slices
from bfpack_spark.stats.figures import MOD, add_figures


class AuditError(RuntimeError):
    """The written tables do not account for every input token; nothing was committed."""


@dataclass(frozen=True)
class AuditResult:
    passed: bool
    checks: dict[str, bool]
    found: dict
    expected: dict

    def raise_if_failed(self) -> None:
        if not self.passed:
            failed = [name for name, ok in self.checks.items() if not ok]
            raise AuditError(f"audit failed, nothing committed: {'; '.join(failed)} "
                             f"(found {self.found}, expected {self.expected})")


def check(files_by_table: dict[str, list], footers: dict[tuple[str, str], tuple[int, int]], expected: dict, *,
          seq_len: int, chunked: bool, loss_masks: bool = False, max_segments: int | None = None) -> AuditResult:
    """The audit's checks. ``files_by_table``: the StagedFiles of each table; ``footers``: per
    (table, file path), (rows, token values) read from its Parquet footer; ``expected``: the read stage's and the
    plan's counts (sequences, tokens, segments, documents, documents_read, documents_rejected); ``loss_masks``:
    the run carries them; ``max_segments``: the cap on segments per sequence."""
    seqs = add_figures(f.figures for f in files_by_table["sequences"])
    docs = add_figures(f.figures for f in files_by_table["documents"])
    k = expected["sequences"]
    found = {
        "sequences": seqs.get("rows", 0), "tokens": seqs.get("tokens", 0), "segments": seqs.get("segments", 0),
        "max_sequence_tokens": seqs.get("max_tokens", 0), "inconsistent_rows": seqs.get("inconsistent_rows", 0),
        "documents": docs.get("rows", 0), "rejects": sum(f.rows for f in files_by_table["rejects"]),
    }
    written = [f for name in ("sequences", "documents", "rejects") for f in files_by_table[name]]
    footer_ok = all(footers.get((f.table, f.path), (None, None))[0] == f.rows for f in written) and all(
        footers[(f.table, f.path)][1] == f.figures.get("tokens") for f in files_by_table["sequences"])
    checks = {
        "every file's footer matches what its writer counted": footer_ok,
        "sequences match the plan": found["sequences"] == k,
        "seq_id is 0..sequences-1, each once": seqs.get("id_sum", 0) == (k * (k - 1) // 2) % MOD
        and seqs.get("id_square_sum", 0) == ((k - 1) * k * (2 * k - 1) // 6) % MOD,
        "tokens in sequences = tokens of packed documents": found["tokens"] == expected["tokens"]
        == docs.get("tokens", 0),
        "no sequence above seq_len": found["max_sequence_tokens"] <= seq_len,
        "rows consistent (n_tokens, segments)": found["inconsistent_rows"] == 0,
        "each document's tokens in sequences = its length": seqs.get("doc_lengths", 0) == docs.get("doc_lengths", 0),
        "segments match the plan": found["segments"] == expected["segments"],
        "documents read = packed + rejected": expected["documents_read"] == found["documents"]
        + expected["documents_rejected"],
        "documents written": found["documents"] == expected["documents"],
        "rejects written": found["rejects"] == expected["documents_rejected"],
    }
    if chunked:
        checks["every chunk in exactly one sequence"] = seqs.get("doc_starts", 0) == docs.get("doc_starts", 0)
    if loss_masks:
        found["loss_tokens"] = seqs.get("loss_tokens", 0)
        checks["loss masks carried token by token"] = (
            seqs.get("loss_tokens", -1) == docs.get("loss_tokens", -2)
            and seqs.get("loss_positions", -1) == docs.get("loss_positions", -2))
    if max_segments is not None:
        found["max_segments"] = seqs.get("max_segments", 0)
        checks["no sequence above max_segments_per_sequence"] = found["max_segments"] <= max_segments
    return AuditResult(all(checks.values()), checks, found, expected)


#: footers each audit task reads at once
_FOOTER_THREADS = 8


def read_footers(spark, staging, files: list) -> dict[tuple[str, str], tuple[int, int]]:
    """(rows, token values) from the footer of every written file, read in Spark tasks."""
    if not files:
        return {}
    rows = [(f.table, f.path, join(staging.table_uri(f.table), f.path)) for f in files]

    def read(_task: int, mine: list) -> Iterator[pa.RecordBatch]:
        if not mine:
            return
        with ThreadPoolExecutor(_FOOTER_THREADS) as pool:  # footers on an object store wait on the network
            figures = list(pool.map(lambda row: footer_figures(row[2], row[0]), mine))
        yield pa.RecordBatch.from_pydict({"table": [r[0] for r in mine], "path": [r[1] for r in mine],
                                          "rows": [f[0] for f in figures], "tokens": [f[1] for f in figures]})

    n = min(len(rows), spark.sparkContext.defaultParallelism)
    found = map_slices(spark, rows, n, read, "table string, path string, rows bigint, tokens bigint").collect()
    return {(r["table"], r["path"]): (r["rows"], r["tokens"]) for r in found}
