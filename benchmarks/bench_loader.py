"""The training-side reader against a plain pyarrow read of the same table files, L = 2048.

    python benchmarks/bench_loader.py                   # packs 40M synthetic tokens, then measures
    python benchmarks/bench_loader.py --root out/demo   # an existing output root

Measured in the same run, over the same snapshot files:
  (a) plain pyarrow: ``pq.read_table`` of ``input_ids`` and ``seg_lengths``, file by file (the floor);
  (b) ``PackedSequences`` iterated in the process (one core);
  (c) a DataLoader with 2 workers, :func:`collate` (``cu_seqlens``, ``max_seqlen``), batch 8 and 32;
  (d) batch 8 with the SDPA block mask (``[B, 1, L, L]`` booleans) built in the workers, and
      built in the training process from the batch's ``seq_lens`` (as on a GPU).
Prints sequences/s and tokens/s, and each against (a).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
from bench_pipeline import write_corpus
from torch.utils.data import DataLoader

from bfpack_spark.config import load_config
from bfpack_spark.job import run
from bfpack_spark.loader import PackedSequences, causal_block_mask, collate
from bfpack_spark.snapshot import open_sequences
from bfpack_spark.spark.session import get_spark


def pack_synthetic(work: Path, tokens: int, seq_len: int) -> str:
    median = 600
    n_docs = tokens // 900  # mean of the log-normal below is about 1.5x its median
    write_corpus(work / "corpus", n_docs, median, 1.0, n_files=8)
    out = str(work / "out")
    spark = get_spark("local[2]", "bench-loader", {"spark.ui.showConsoleProgress": "false"})
    run(load_config(None, {"input.paths": [str(work / "corpus")], "input.token_column": "tokens",
                           "output.output": out, "packing.seq_len": seq_len}), spark)
    spark.stop()
    return out


def timed(label: str, n_seqs: int, seq_len: int, seconds: float, floor: float | None) -> float:
    rate = n_seqs / seconds
    ratio = "" if floor is None else f"   {rate / floor:5.2f}x of (a)"
    print(f"{label:<44} {n_seqs:>8,} seqs {seconds:7.2f} s {rate:>10,.0f} seq/s "
          f"{rate * seq_len / 1e6:7.1f}M tok/s{ratio}")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="output root to read (default: pack a synthetic corpus first)")
    parser.add_argument("--tokens", type=int, default=40_000_000, help="synthetic corpus size")
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        root = args.root or pack_synthetic(Path(tmp), args.tokens, args.seq_len)
        snapshot = open_sequences(root)
        L, n = snapshot.seq_len, snapshot.rows
        print(f"table: {root}, {n:,} sequences of L={L} in {len(snapshot.files)} files")

        start = time.perf_counter()
        rows = sum(pq.read_table(f.uri, columns=["input_ids", "seg_lengths"]).num_rows for f in snapshot.files)
        floor = timed("(a) pyarrow read of the files", rows, L, time.perf_counter() - start, None)

        start = time.perf_counter()
        count = sum(1 for _ in PackedSequences(root, seed=0))
        timed("(b) PackedSequences, in process", count, L, time.perf_counter() - start, floor)

        runs = (("(c) DataLoader, 2 workers, batch 8", 8, False, False),
                ("(c) DataLoader, 2 workers, batch 32", 32, False, False),
                ("(d) batch 8, SDPA mask made in the workers", 8, True, False),
                ("(d) batch 8, SDPA mask made by the consumer", 8, False, True))
        for label, batch_size, in_workers, by_consumer in runs:
            loader = DataLoader(PackedSequences(root, seed=0), batch_size=batch_size, num_workers=2,
                                collate_fn=partial(collate, sdpa_mask=in_workers))
            start = time.perf_counter()
            count = 0
            for batch in loader:
                if by_consumer:
                    causal_block_mask(batch["seq_lens"], L)
                count += len(batch["seq_id"])
            timed(label, count, L, time.perf_counter() - start, floor)


if __name__ == "__main__":
    main()
