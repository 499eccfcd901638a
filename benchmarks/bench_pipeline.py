"""The Spark pipeline on local[2]: best-fit packing against the concatenate-and-cut pipeline.

    python benchmarks/bench_pipeline.py                    # 1M documents, median 300 tokens
    python benchmarks/bench_pipeline.py --docs 200000      # smaller
    python benchmarks/bench_pipeline.py --sorted --docs 300000 --median 500   # files sorted by length
    python benchmarks/bench_pipeline.py --input corpus/    # your tokenized corpus (id + tokens)
    python benchmarks/bench_pipeline.py --cli --repeat 5   # through the CLI: fresh processes, JVM start included

Writes a synthetic tokenized corpus (log-normal document lengths, random token ids)
as Parquet, then runs in one Spark session, on the same corpus and writing the same
tables: best-fit packing and the concatenation baseline (``strategy=concat``). Prints
documents and tokens per second, per-stage times, the time ratio against concat, the
sequence count against one-process BFD over the whole corpus and against the lower
bound, and the share of tokens that moved between groups. ``--cli`` runs each instead as
``bfpack pack-tokenized`` in a fresh process (what a user's run costs: JVM start included),
strategies alternating, each round's wall time and stats row. ``--sorted`` writes the
documents sorted by length, so each file holds one length range: no group is
representative, the worst case for keeping tokens where they were read.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import DeltaTable

from bfpack_spark.config import load_config
from bfpack_spark.job import run
from bfpack_spark.packing import bfd_layout
from bfpack_spark.spark.session import get_spark


def write_corpus(root: Path, n_docs: int, median: float, sigma: float, n_files: int, seed: int = 0,
                 by_length: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lengths = np.maximum(rng.lognormal(np.log(median), sigma, n_docs).astype(np.int64), 1)
    if by_length:
        lengths = np.sort(lengths)
    root.mkdir(parents=True, exist_ok=True)
    for f, part in enumerate(np.array_split(np.arange(n_docs), n_files)):
        lens = lengths[part]
        values = rng.integers(0, 100_000, int(lens.sum()), dtype=np.int32)
        offsets = np.concatenate(([0], np.cumsum(lens))).astype(np.int32)
        table = pa.table({"id": pa.array([f"doc-{i:09d}" for i in part]),
                          "tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))})
        pq.write_table(table, root / f"part-{f:04d}.parquet", row_group_size=16_384)
    return lengths


def cli_pack(corpus: str, out: Path, strategy: str, columns: tuple[str, str], seq_len: int) -> tuple[dict, float]:
    """``bfpack pack-tokenized`` in a fresh process on local[2]: its stats row and wall time."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bfpack_spark.cli", "pack-tokenized", "--input", corpus,
                           "--id-column", columns[0], "--token-column", columns[1], "--output", str(out),
                           "--seq-len", str(seq_len), "--strategy", strategy, "--master", "local[2]", "-q"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"bfpack failed: {done.stderr[-3000:]}")
    return DeltaTable(str(out / "stats")).to_pyarrow_table().to_pylist()[0], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--median", type=float, default=300)
    parser.add_argument("--sigma", type=float, default=1.2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--sorted", action="store_true", help="documents sorted by length across the files")
    parser.add_argument("--input", default=None,
                        help="an existing tokenized corpus (Parquet/Delta/JSONL) instead of the synthetic one")
    parser.add_argument("--token-column", default="tokens", help="with --input: the token list column")
    parser.add_argument("--id-column", default="id", help="with --input: the id column")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    parser.add_argument("--runs", default="concat,bfd", help="strategies to run, in order")
    parser.add_argument("--repeat", type=int, default=2, help="rounds over --runs; the best round counts")
    parser.add_argument("--cli", action="store_true", help="run `bfpack pack-tokenized` in fresh processes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bfpack-bench-"))
    t0 = time.perf_counter()
    if args.input:
        corpus, one_process = args.input, None  # one-process BFD from the packed documents' lengths
        print(f"corpus: {corpus} (columns {args.id_column!r}, {args.token_column!r})")
    else:
        corpus = str(work / "corpus")
        lengths = write_corpus(work / "corpus", args.docs, args.median, args.sigma, args.files, by_length=args.sorted)
        print(f"corpus: {args.docs:,} documents, {int(lengths.sum()):,} tokens (log-normal median "
              f"{args.median:g}, sigma {args.sigma:g}{', sorted by length' if args.sorted else ''}) "
              f"in {args.files} Parquet files, written in "
              f"{time.perf_counter() - t0:.1f}s")
        one_process = bfd_layout(lengths, args.seq_len).n_sequences

    spark = None if args.cli else get_spark("local[2]", "bfpack-bench", {"spark.ui.showConsoleProgress": "false"})

    def pack(corpus: str, out: Path, strategy: str, columns: tuple[str, str] = ("id", "tokens")):
        if args.cli:
            return cli_pack(corpus, out, strategy, columns, args.seq_len)
        config = load_config(None, {
            "input.paths": [corpus], "input.id_column": columns[0], "input.token_column": columns[1],
            "output.output": str(out), "packing.seq_len": args.seq_len, "packing.strategy": strategy,
        })
        t0 = time.perf_counter()
        result = run(config, spark)
        return result.stats, time.perf_counter() - t0

    # Warm up the JVM, the Python workers and numba's cache on a small corpus, untimed.
    write_corpus(work / "warmup", 20_000, args.median, args.sigma, 2, seed=1)
    for strategy in ("concat", "bfd"):
        pack(str(work / "warmup"), work / f"warmup-{strategy}", strategy)
        shutil.rmtree(work / f"warmup-{strategy}", ignore_errors=True)

    results: dict[str, list[float]] = {}
    for round_ in range(args.repeat):
        for strategy in args.runs.split(","):
            out = work / f"out-{strategy}"
            s, seconds = pack(corpus, out, strategy, (args.id_column, args.token_column))
            results.setdefault(strategy, []).append(seconds)
            if one_process is None:
                lengths = DeltaTable(str(out / "documents")).to_pyarrow_table(columns=["n_tokens"])
                one_process = bfd_layout(lengths.column(0).to_numpy(), args.seq_len).n_sequences
            lower = -(-s["tokens"] // args.seq_len)
            print(f"\n== {strategy}, round {round_ + 1}: {seconds:.1f}s wall, "
                  f"{s['documents_packed'] / seconds:,.0f} docs/s, {s['tokens'] / seconds / 1e6:.2f} M tokens/s")
            print(f"   sequences {s['sequences']:,} (one-process BFD {one_process:,}: "
                  f"{s['sequences'] - one_process:+,}; lower bound {lower:,}: +{s['sequences'] - lower:,}); "
                  f"truncations/doc {s['truncations_per_document']:.4f}; "
                  f"moved tokens {s['moved_tokens'] / max(1, s['tokens']):.1%}; "
                  f"groups {s['input_groups']}, audit {'passed' if s['audit_passed'] else 'FAILED'}"
                  + (f", first round {s['plan_first_round']}" if s.get("plan_first_round") else ""))
            print("   stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in dict(s["stage_seconds"]).items()))
            shutil.rmtree(out, ignore_errors=True)
    best = {spec: min(times) for spec, times in results.items()}
    print(f"\nbest of {args.repeat} rounds: " + ", ".join(f"{k} {v:.1f}s" for k, v in best.items()))
    if "concat" in best and "bfd" in best:
        ratios = [b / c for b, c in zip(results["bfd"], results["concat"])]  # each round's own pair
        print(f"time ratio best-fit / concat: best rounds {best['bfd'] / best['concat']:.2f}; per round "
              f"{', '.join(f'{r:.2f}' for r in ratios)}, median {statistics.median(ratios):.2f} (target <= 1.2)")
    if spark is not None:
        spark.stop()
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
