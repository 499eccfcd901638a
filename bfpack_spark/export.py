"""``bfpack export``: the ``sequences`` table in the formats trainers read.

- ``npy``: fixed-length memmaps in the style of OLMo-core and Megatron (layout below);
- ``hf``: a Hugging Face ``datasets`` dataset (``datasets.load_from_disk``) with the columns
  transformers / TRL padding-free training reads.

Both read the table one file at a time (memory: one table file), write into a temporary
directory beside the destination and rename it at the end, so a killed export leaves no
half dataset; both count what they wrote against the Delta log before the rename.

``npy`` layout (row ``r`` of a run is its sequence ``seq_id = r``; runs follow each other in
run-id order, ``manifest.json`` lists them with their first row):

- ``tokens.npy``: ``uint32 [sequences, L]``, each row the sequence's tokens, then ``pad_id``;
- ``seq_lens.npy``: ``int64 [segments, 2]``, one row per segment in sequence order:
  ``offset`` (index of its first token in ``tokens.ravel()``, so its sequence is
  ``offset // L``) and ``length``;
- ``manifest.json``: format, ``seq_len``, ``pad_id``, ``eos_id``, ``tokenizer``, the counts
  of sequences, segments and tokens, and the source runs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bfpack_spark.io.files import read_parquet
from bfpack_spark.io.snapshot import SequencesSnapshot, open_sequences

log = logging.getLogger(__name__)

NPY_FORMAT = "bfpack-npy/1"


class ExportError(RuntimeError):
    """The export cannot be made as asked; the message says why."""


@contextmanager
def _staged_dir(dest: Path) -> Iterator[Path]:
    """A temporary directory beside ``dest``, renamed to ``dest`` when the block succeeds."""
    if dest.exists():
        raise ExportError(f"{dest} already exists; remove it or export to another directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp / "out", dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _flat(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A list column's values and offsets as numpy arrays."""
    arr = column.combine_chunks()
    return arr.values.to_numpy(), arr.offsets.to_numpy().astype(np.int64)


def _segment_positions(seg_values: np.ndarray, seg_offsets: np.ndarray) -> np.ndarray:
    """Each segment's start within its sequence."""
    starts = np.concatenate([[0], np.cumsum(seg_values, dtype=np.int64)])  # in the file's flat tokens
    return starts[:-1] - np.repeat(starts[seg_offsets[:-1]], np.diff(seg_offsets))


def _progress(what: str, i: int, n: int, rows: int) -> None:
    log.info("export %s: file %d/%d (%s sequences)", what, i, n, f"{rows:,}")


def export_npy(snapshot: SequencesSnapshot, dest: Path) -> dict:
    """Write the npy layout (module docstring); return the manifest."""
    L, files = snapshot.seq_len, snapshot.files
    run_rows = {r: sum(f.rows for f in files if f.run_id == r) for r in snapshot.run_ids}
    run_base = dict(zip(snapshot.run_ids, np.concatenate([[0], np.cumsum(list(run_rows.values()))]).tolist()))
    n = snapshot.rows
    # pass 1: where each file's rows go, and how many segments each sequence has
    n_segments = np.full(n, -1, dtype=np.int64)
    for f in files:
        t = read_parquet(f.uri, ["seq_id", "seg_lengths"])
        seq_ids = t["seq_id"].to_numpy()
        if seq_ids.size and (seq_ids.min() < 0 or seq_ids.max() >= run_rows[f.run_id]):
            raise ExportError(f"{f.uri}: seq_id outside 0..{run_rows[f.run_id] - 1} of run {f.run_id}")
        rows = run_base[f.run_id] + seq_ids
        if (n_segments[rows] >= 0).any():
            raise ExportError(f"{f.uri}: a seq_id of run {f.run_id} is in several rows")
        n_segments[rows] = t["seg_lengths"].combine_chunks().value_lengths().to_numpy()
    if (n_segments < 0).any():
        raise ExportError(f"sequence ids of {snapshot.root} are not dense: {int((n_segments < 0).sum())} missing")
    first_segment = np.concatenate([[0], np.cumsum(n_segments)])
    total_segments = int(first_segment[-1])
    with _staged_dir(dest) as tmp:
        out = tmp / "out"
        out.mkdir()
        tokens = np.lib.format.open_memmap(out / "tokens.npy", mode="w+", dtype=np.uint32, shape=(n, L))
        segments = np.lib.format.open_memmap(out / "seq_lens.npy", mode="w+", dtype=np.int64,
                                             shape=(total_segments, 2))
        written_tokens = written_segments = 0
        for i, f in enumerate(files, 1):
            t = read_parquet(f.uri, ["seq_id", "input_ids", "seg_lengths"])
            rows = run_base[f.run_id] + t["seq_id"].to_numpy()
            values, offsets = _flat(t["input_ids"])
            seg_values, seg_offsets = _flat(t["seg_lengths"])
            lengths = np.diff(offsets)
            block = np.full((len(rows), L), snapshot.pad_id, dtype=np.uint32)
            row_of = np.repeat(np.arange(len(rows)), lengths)
            block[row_of, np.arange(len(values)) - np.repeat(offsets[:-1], lengths)] = values
            tokens[rows] = block
            counts = np.diff(seg_offsets)
            slots = np.repeat(first_segment[rows], counts) + (np.arange(len(seg_values))
                                                             - np.repeat(seg_offsets[:-1], counts))
            segments[slots, 0] = np.repeat(rows * L, counts) + _segment_positions(seg_values, seg_offsets)
            segments[slots, 1] = seg_values
            written_tokens += len(values)
            written_segments += len(seg_values)
            _progress("npy", i, len(files), len(rows))
        tokens.flush()
        segments.flush()
        if written_segments != total_segments or int(segments[:, 1].sum()) != written_tokens:
            raise ExportError(f"wrote {written_segments} segments of {total_segments}; nothing was exported")
        manifest = {
            "format": NPY_FORMAT, "seq_len": L, "pad_id": snapshot.pad_id, "eos_id": snapshot.eos_id,
            "tokenizer": snapshot.tokenizer, "sequences": n, "segments": total_segments, "tokens": written_tokens,
            "table_version": snapshot.version, "source": snapshot.root,
            "runs": [{"run_id": r, "first_row": run_base[r], "sequences": run_rows[r]} for r in snapshot.run_ids],
            "files": {"tokens.npy": {"dtype": "uint32", "shape": [n, L]},
                      "seq_lens.npy": {"dtype": "int64", "shape": [total_segments, 2],
                                       "columns": ["offset", "length"]}},
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _hf_part(t: pa.Table) -> pa.Table:
    """One table file as the padding-free columns: unpadded tokens, restarting position ids."""
    ids = t["input_ids"].combine_chunks()
    seg_values, _ = _flat(t["seg_lengths"])
    ends = np.cumsum(seg_values, dtype=np.int64)
    positions = (np.arange(len(ids.values), dtype=np.int64) - np.repeat(ends - seg_values, seg_values))
    position_ids = pa.ListArray.from_arrays(ids.offsets, pa.array(positions.astype(np.int32)))
    return pa.table({"seq_id": t["seq_id"], "run_id": t["run_id"], "input_ids": ids,
                     "position_ids": position_ids, "seq_lengths": t["seg_lengths"]})


def export_hf(snapshot: SequencesSnapshot, dest: Path) -> dict:
    """Write a ``datasets`` dataset (``save_to_disk``); return a summary."""
    try:
        import datasets
    except ImportError:
        raise ExportError("--format hf needs the datasets package: pip install 'bfpack-spark[hf]'") from None
    with _staged_dir(dest) as tmp:
        parts, tokens = [], 0
        (tmp / "parts").mkdir()
        for i, f in enumerate(snapshot.files, 1):
            t = read_parquet(f.uri, ["seq_id", "run_id", "input_ids", "seg_lengths"]).sort_by("seq_id")
            part = _hf_part(t)
            path = tmp / "parts" / f"part-{i:05d}.parquet"
            pq.write_table(part, path)
            parts.append(str(path))
            tokens += len(part["input_ids"].combine_chunks().values)
            _progress("hf", i, len(snapshot.files), t.num_rows)
        shown = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # our own progress lines are the export's output
        try:
            dataset = datasets.Dataset.from_parquet(parts, cache_dir=str(tmp / "cache"), split="train")
            dataset.save_to_disk(str(tmp / "out"))
            check = datasets.load_from_disk(str(tmp / "out"))
        finally:
            if shown:
                datasets.enable_progress_bars()
        if check.num_rows != snapshot.rows:
            raise ExportError(f"the dataset has {check.num_rows} rows, the table {snapshot.rows}; nothing exported")
        del dataset, check
    return {"format": "hf", "sequences": snapshot.rows, "tokens": tokens, "seq_len": snapshot.seq_len,
            "runs": list(snapshot.run_ids), "table_version": snapshot.version}


def export(root: str, fmt: Literal["hf", "npy"], to: str, run_id: str | None = None) -> dict:
    """Export ``<root>/sequences`` (one snapshot, optionally one run) to the directory ``to``."""
    snapshot = open_sequences(root, run_id=run_id)
    dest = Path(to)
    if fmt == "npy":
        return export_npy(snapshot, dest)
    if fmt == "hf":
        return export_hf(snapshot, dest)
    raise ExportError(f"unknown export format {fmt!r} (hf or npy)")
