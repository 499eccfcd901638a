"""What one small input file costs a read task: the same documents read from N small files and from one.

    python benchmarks/bench_small_files.py                 # 6,000 files of each format, best of five
    python benchmarks/bench_small_files.py --files 2000 --repeat 3

Web corpora can come as many small files; a read task pays for each file what reading it takes
(opening it, its decoder's or reader's set-up) beyond its documents. This reads the same documents
(about a kilobyte each, with ids, one or two per file, as ``bench_many_files.py``'s 100,000-file
layouts hold them) with the read tasks' own code (:func:`bfpack_spark.io.formats.read_group_splits`,
no Spark, no tokenizer) from N small files and from one file, in one process on one core, and prints
the microseconds each small file adds: ``(many - one) / N``, both measured in the same run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bfpack_spark.io.formats import read_group_splits
from bfpack_spark.io.formats.base import Fields, Split


def write(root: Path, fmt: str, docs: list[tuple[str, str]], n_files: int) -> list[Split]:
    """``docs`` as ``n_files`` files of ``fmt`` under ``root``, as the read tasks are given them."""
    root.mkdir(parents=True, exist_ok=True)
    splits = []
    for f in range(n_files):
        part = docs[f * len(docs) // n_files:(f + 1) * len(docs) // n_files]
        path = root / f"part-{f:06d}.{'parquet' if fmt == 'parquet' else 'jsonl.gz'}"
        if fmt == "parquet":
            pq.write_table(pa.table({"id": [i for i, _ in part], "text": [t for _, t in part]}), path,
                           compression="zstd")
        else:
            lines = "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in part)
            path.write_bytes(gzip.compress(lines.encode(), compresslevel=1))
        splits.append(Split(str(path), path.name, fmt if fmt == "parquet" else "jsonl", path.stat().st_size,
                            None if fmt == "parquet" else "gzip"))
    return splits


def seconds(splits: list[Split], repeat: int) -> float:
    """The best of ``repeat`` reads of every split (the page cache warm), and a check of the documents."""
    fields = Fields("text", id_column="id")
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        n = sum(len(batch) for batch in read_group_splits(splits, fields))
        best = min(best, time.perf_counter() - t0)
    return best if n else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=6000, help="small files of each format")
    parser.add_argument("--docs-per-file", type=float, default=1.1, help="documents per small file (1.1: as "
                        "bench_many_files.py's 100,000-file layouts)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    words = Path(__file__).read_text().split()
    n_docs = int(args.files * args.docs_per_file)
    docs = [(f"doc-{i}", " ".join(words[(i * 37) % len(words):][:150])) for i in range(n_docs)]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-small-files-") as tmp:
        for fmt in ("jsonl.gz", "parquet"):
            many = write(Path(tmp) / f"{fmt}-many", fmt, docs, args.files)
            one = write(Path(tmp) / f"{fmt}-one", fmt, docs, 1)
            rounds = [(seconds(many, args.repeat), seconds(one, args.repeat)) for _ in range(3)]
            per_file = statistics.median((m - o) / len(many) * 1e6 for m, o in rounds)
            m, o = statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)
            print(f"{fmt}: {n_docs:,} documents from {len(many):,} files {m:.2f} s, from one file {o:.2f} s: "
                  f"{per_file:.0f} µs per small file ({m / o:.1f}x)", flush=True)
            results[fmt] = {"files": len(many), "documents": n_docs, "many_s": m, "one_s": o,
                            "us_per_file": per_file}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
