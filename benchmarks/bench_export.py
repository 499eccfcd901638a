"""Export rate per core, each format against reading the same table with pyarrow, in one Spark session.

    python benchmarks/bench_export.py                       # the 1M-document pipeline benchmark table
    python benchmarks/bench_export.py --docs 200000 --repeat 3
    python benchmarks/bench_export.py --workdir /work/bench-results/export   # keep (and reuse) the table
    python benchmarks/bench_export.py --export-dir /dev/shm/bfpack-export    # exports to memory: no disk writeback

Packs the synthetic corpus of ``bench_pipeline.py`` (1M documents, log-normal lengths, median 300
tokens, L = 2048) once, then, ``--repeat`` rounds in one session on local[2]: a Spark job that reads
every table file with pyarrow (the columns an export reads, one task per file, nothing written:
the floor; row group by row group, as the export reads), a Spark job that writes as many bytes as
the megatron export from memory to the export directory (one task per file: what the store
itself takes to write those bytes), and ``bfpack export`` to each format (one task per file,
shards written to the export directory). Each round runs them in another order. Prints seconds,
tokens per second per core, and each time over the read's, the median of the rounds. The goal
(issue 21): every format within 1.5x of the read.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).parent))

from bench_pipeline import write_corpus  # noqa: E402

from bfpack_spark.config import load_config  # noqa: E402
from bfpack_spark.export import export  # noqa: E402
from bfpack_spark.io.store.fs import parquet_row_groups  # noqa: E402
from bfpack_spark.job import run  # noqa: E402
from bfpack_spark.snapshot import open_sequences  # noqa: E402
from bfpack_spark.spark.partitioning import map_slices  # noqa: E402
from bfpack_spark.spark.session import get_spark  # noqa: E402

COLUMNS = ["seq_id", "run_id", "input_ids", "seg_lengths"]


def read_all(spark, root: str) -> tuple[float, int]:
    """Seconds to read every file of the table's snapshot in Spark tasks (one per file), and its tokens."""
    files = open_sequences(root).files

    def read(_i: int, mine: list):
        for f in mine:
            tokens = sum(pc.sum(pc.list_value_length(g["input_ids"])).as_py() or 0
                         for g in parquet_row_groups(f.uri, COLUMNS))
            yield pa.RecordBatch.from_pylist([{"tokens": tokens}])

    t0 = time.perf_counter()
    rows = map_slices(spark, list(files), len(files), read, "tokens bigint").collect()
    return time.perf_counter() - t0, sum(r["tokens"] for r in rows)


def write_all(spark, root: str, dest: Path, seq_len: int) -> float:
    """Seconds to write, in Spark tasks (one per table file), the bytes of the megatron export's shards
    (rows x L int32 tokens) from memory to ``dest``: what the store takes to write them."""
    files = [(i, f.rows * seq_len * 4) for i, f in enumerate(open_sequences(root).files)]
    dest.mkdir(parents=True, exist_ok=True)

    def write(_i: int, mine: list):
        block = np.ones(16 << 20, np.uint8)
        for i, size in mine:
            with open(dest / f"part-{i:05d}.bin", "wb") as fh:
                for at in range(0, size, block.size):
                    fh.write(block[:min(block.size, size - at)])
            yield pa.RecordBatch.from_pylist([{"bytes": size}])

    t0 = time.perf_counter()
    map_slices(spark, files, len(files), write, "bytes bigint").collect()
    seconds = time.perf_counter() - t0
    shutil.rmtree(dest)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--median", type=float, default=300)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--formats", default="megatron,olmo,hf")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory (removed)")
    parser.add_argument("--export-dir", default=None,
                        help="where the exports go (default: the workdir); /dev/shm takes the disk's writeback out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bfpack-export-bench-"))
    spark = get_spark(f"local[{args.cores}]", "bench-export")
    packed = work / f"packed-{args.docs}"
    if not (packed / "stats" / "_delta_log").is_dir():
        write_corpus(work / "corpus", args.docs, args.median, 1.2, 16)
        run(load_config(None, {"input.paths": [str(work / "corpus")], "input.token_column": "tokens",
                               "output.output": str(packed), "packing.seq_len": args.seq_len}), spark)
    snapshot = open_sequences(str(packed))
    print(f"table: {packed} ({snapshot.rows:,} sequences, {snapshot.tokens:,} tokens, {len(snapshot.files)} files), "
          f"local[{args.cores}]")
    read_all(spark, str(packed))  # warm: the page cache holds the table for every contender alike
    formats = args.formats.split(",")
    names = ["read", "write", *formats]
    times: dict[str, list[float]] = {name: [] for name in names}
    out_dir = Path(args.export_dir or work)
    for r in range(args.repeat):
        for name in names[r % len(names):] + names[:r % len(names)]:  # each round in another order
            if name == "read":
                seconds = read_all(spark, str(packed))[0]
            elif name == "write":
                seconds = write_all(spark, str(packed), out_dir / "write", args.seq_len)
            else:
                dest = out_dir / f"export-{name}"
                shutil.rmtree(dest, ignore_errors=True)
                t0 = time.perf_counter()
                export(str(packed), name, str(dest), spark=spark)
                seconds = time.perf_counter() - t0
                shutil.rmtree(dest)
            times[name].append(seconds)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    floor = statistics.median(times["read"])
    print(f"\nmedian of {args.repeat} rounds ({snapshot.tokens:,} tokens):")
    for name, values in times.items():
        m = statistics.median(values)
        rate = snapshot.tokens / m / args.cores
        print(f"  {name:9s} {m:7.2f}s  {rate / 1e6:6.1f} M tokens/s per core  {m / floor:5.2f}x the read")
    spark.stop()
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
