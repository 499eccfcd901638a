"""The audit: before anything is committed, show that no token was lost or doubled.

Every task that writes a table file computes *figures* over exactly the arrays it hands
to the Parquet writer (:func:`sequence_figures`, :func:`document_figures`). The driver
adds them up and holds them against what the read stage counted and the plan decided
(:func:`check`). A Spark job then opens the footer of every written file and compares
its row count, and for sequences its count of token values, with the writer's figures
(:func:`footer_figures`), so a file that is missing, cut short or different fails the
audit without reading the data again.

Per-document conservation uses order-free checksums (sums modulo 2^64 of a 64-bit hash):
of (document id x its token count) on both sides, and of (document id, chunk start) on
both sides, so every document's tokens and every chunk appear exactly once, up to hash
collisions. Loss masks, where a run has them, are checked the same way, token by token: a
sum over every (document id, token position) whose mask is 1, from the documents' masks as
read and from the masks the sequences carry.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import zip_longest

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bfpack_spark.io.files import filesystem, join
from bfpack_spark.packing._jit import jit
from bfpack_spark.spark.partitioning import map_slices

MOD = 2**64
_CHECKSUMS = ("doc_lengths", "doc_starts", "id_sum", "id_square_sum", "loss_positions")
_POSITION = np.uint64(0xD6E8FEB86659FD93)


class AuditError(RuntimeError):
    """The written tables do not account for every input token; nothing was committed."""


@jit
def _mix(h):
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


@jit
def _string_hashes(offsets, data):
    out = np.empty(offsets.shape[0] - 1, np.uint64)
    for i in range(out.shape[0]):
        h = np.uint64(0xCBF29CE484222325)
        for j in range(offsets[i], offsets[i + 1]):
            h = (h ^ np.uint64(data[j])) * np.uint64(0x100000001B3)
        out[i] = _mix(h)
    return out


@jit
def _weighted_sum(hashes, weights):
    total = np.uint64(0)
    for i in range(hashes.shape[0]):
        total += hashes[i] * np.uint64(weights[i])
    return total


@jit
def _start_sum(hashes, starts):
    total = np.uint64(0)
    for i in range(hashes.shape[0]):
        total += _mix(hashes[i] ^ (np.uint64(starts[i]) * np.uint64(0x9E3779B97F4A7C15)))
    return total


@jit
def _chunk_start_sum(hashes, n_chunks, seq_len):
    total = np.uint64(0)
    for i in range(hashes.shape[0]):
        for k in range(n_chunks[i]):
            total += _mix(hashes[i] ^ (np.uint64(k * seq_len) * np.uint64(0x9E3779B97F4A7C15)))
    return total


@jit
def _document_loss_positions(hashes, offsets, masks):
    """Checksum of every (document, position) whose mask is 1; ``offsets`` index ``masks`` per document."""
    total = np.uint64(0)
    for i in range(hashes.shape[0]):
        for j in range(offsets[i + 1] - offsets[i]):
            if masks[offsets[i] + j]:
                total += _mix(hashes[i] ^ (np.uint64(j) * _POSITION))
    return total


@jit
def _segment_loss_positions(hashes, starts, lengths, masks):
    """The same checksum from segments (document hash, start in the document, length) laid end to end
    over ``masks``."""
    total = np.uint64(0)
    pos = 0
    for i in range(hashes.shape[0]):
        for j in range(lengths[i]):
            if masks[pos + j]:
                total += _mix(hashes[i] ^ (np.uint64(starts[i] + j) * _POSITION))
        pos += lengths[i]
    return total


@jit
def _id_sums(ids):
    total = np.uint64(0)
    squares = np.uint64(0)
    for i in range(ids.shape[0]):
        v = np.uint64(ids[i])
        total += v
        squares += v * v
    return total, squares


def id_hashes(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each string's UTF-8 bytes (FNV-1a, then a mixer)."""
    arr = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    arr = arr.cast(pa.large_string())
    _, offsets, data = arr.buffers()
    offsets = np.frombuffer(offsets, np.int64)[arr.offset:arr.offset + len(arr) + 1]
    data = np.frombuffer(data, np.uint8) if data is not None else np.empty(0, np.uint8)
    return _string_hashes(offsets, data)


def _list_lengths(column) -> np.ndarray:
    return pc.fill_null(pc.list_value_length(column), -1).to_numpy()


#: ``segments_histogram[k]``: sequences of k segments; the last entry counts this many or more.
MAX_SEGMENTS_BIN = 64


def segment_bins(max_segments: int | None) -> int:
    """The last entry of ``segments_histogram`` (it counts this many segments or more): 64, or the cap."""
    return max(MAX_SEGMENTS_BIN, max_segments or 0)


def sequence_figures(table: pa.Table, seq_len: int, max_bin: int = MAX_SEGMENTS_BIN) -> dict:
    """Figures of a sequences table as written (columns of :data:`~bfpack_spark.schemas.SEQUENCES`);
    with the fill (percent of ``seq_len``, 0..100) and segment-count histograms the report draws,
    and, where the sequences carry loss masks, the tokens with loss and their positions' checksum."""
    n_tokens = table.column("n_tokens").to_numpy()
    lists = table.column("seg_lengths").combine_chunks()
    seg_lengths = pc.list_flatten(lists).to_numpy()
    offsets = lists.offsets.to_numpy() - lists.offsets[0].as_py()
    ends = np.concatenate(([0], np.cumsum(seg_lengths)))
    inconsistent = ((_list_lengths(table.column("input_ids")) != n_tokens)
                    | (ends[offsets[1:]] - ends[offsets[:-1]] != n_tokens)
                    | (_list_lengths(table.column("doc_ids")) != np.diff(offsets)))
    hashes = id_hashes(pc.list_flatten(table.column("doc_ids")))
    starts = pc.list_flatten(table.column("seg_starts")).to_numpy()
    total, squares = _id_sums(table.column("seq_id").to_numpy())
    segments = np.diff(offsets)
    figures = {
        "rows": table.num_rows, "tokens": int(n_tokens.sum()), "segments": int(seg_lengths.shape[0]),
        "max_tokens": int(n_tokens.max(initial=0)), "max_segments": int(segments.max(initial=0)),
        "inconsistent_rows": int(inconsistent.sum()),
        "id_sum": int(total), "id_square_sum": int(squares),
        "doc_lengths": int(_weighted_sum(hashes, seg_lengths)), "doc_starts": int(_start_sum(hashes, starts)),
        "fill_histogram": np.bincount(n_tokens * 100 // seq_len, minlength=101).tolist(),
        "segments_histogram": np.bincount(np.minimum(segments, max_bin), minlength=max_bin + 1).tolist(),
    }
    masks = table.column("loss_mask") if "loss_mask" in table.column_names else None
    if masks is not None and masks.null_count < len(masks):
        masks = masks.combine_chunks()
        inconsistent |= _list_lengths(masks) != n_tokens
        values = pc.list_flatten(masks).to_numpy(zero_copy_only=False)
        figures.update(inconsistent_rows=int(inconsistent.sum()), loss_tokens=int(values.sum(dtype=np.int64)),
                       loss_positions=int(_segment_loss_positions(hashes, starts.astype(np.int64),
                                                                  seg_lengths.astype(np.int64), values)))
    return figures


def document_figures(doc_ids: pa.Array, n_tokens: np.ndarray, n_chunks: np.ndarray, seq_len: int,
                     masks: np.ndarray | None = None) -> dict:
    """Figures of a documents table as written: each document's length and its chunk starts; with
    ``masks`` (the documents' loss masks laid end to end), the tokens with loss and their positions."""
    hashes = id_hashes(doc_ids)
    figures = {"rows": len(doc_ids), "tokens": int(n_tokens.sum()),
               "doc_lengths": int(_weighted_sum(hashes, n_tokens)),
               "doc_starts": int(_chunk_start_sum(hashes, n_chunks.astype(np.int64), seq_len))}
    if masks is not None:
        offsets = np.concatenate(([0], np.cumsum(n_tokens, dtype=np.int64)))
        figures.update(loss_tokens=int(masks.sum(dtype=np.int64)),
                       loss_positions=int(_document_loss_positions(hashes, offsets, masks)))
    return figures


def add_figures(figures: Iterable[dict]) -> dict:
    """Figures of several files as one: counts and histograms add, checksums add modulo 2^64,
    maxima take the max."""
    total: dict = {}
    for f in figures:
        for key, value in f.items():
            if isinstance(value, list):
                total[key] = [a + b for a, b in zip_longest(total.get(key, []), value, fillvalue=0)]
            elif key.startswith("max_"):
                total[key] = max(total.get(key, 0), value)
            elif key in _CHECKSUMS:
                total[key] = (total.get(key, 0) + value) % MOD
            elif isinstance(value, int):
                total[key] = total.get(key, 0) + value
    return total


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


def check(files_by_table: dict[str, list], footers: dict[tuple[str, str], tuple[int, int]], expected: dict,
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


def footer_figures(uri: str, table: str) -> tuple[int, int]:
    """(rows, token values) from one file's Parquet footer; token values only for sequences."""
    fs, path = filesystem(uri)
    with fs.open_input_file(path) as fh:
        meta = pq.read_metadata(fh)
    tokens = 0
    if table == "sequences":
        for rg in range(meta.num_row_groups):
            group = meta.row_group(rg)
            for c in range(group.num_columns):
                if group.column(c).path_in_schema.startswith("input_ids."):
                    tokens += group.column(c).num_values
    return meta.num_rows, tokens


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
