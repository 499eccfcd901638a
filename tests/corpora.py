"""Small real corpora written to disk for the pipeline tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def lognormal_lengths(n: int, median: float, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return np.maximum(rng.lognormal(np.log(median), sigma, n).astype(np.int64), 1)


def write_tokenized(root: Path, n_files: int = 4, docs_per_file: int = 1500, median: float = 300,
                    sigma: float = 1.3, seed: int = 0, row_group: int = 500) -> dict[str, list[int]]:
    """Parquet files with columns id, tokens (list<int32>); returns {id: tokens}."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    docs: dict[str, list[int]] = {}
    for f in range(n_files):
        lengths = lognormal_lengths(docs_per_file, median, sigma, rng)
        ids = [f"f{f}-d{i}" for i in range(docs_per_file)]
        tokens = [rng.integers(0, 100_000, n, dtype=np.int32) for n in lengths]
        table = pa.table({"id": ids, "tokens": pa.array(tokens, type=pa.list_(pa.int32()))})
        pq.write_table(table, root / f"part-{f:03d}.parquet", row_group_size=row_group)
        docs.update({i: t.tolist() for i, t in zip(ids, tokens)})
    return docs


def write_jsonl(path: Path, records: list[dict | str]) -> None:
    """One JSON object (or a raw line, when given a str) per line."""
    with open(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write((rec if isinstance(rec, str) else json.dumps(rec)) + "\n")
