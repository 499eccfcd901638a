"""What a cap on segments per sequence costs: sequences and the segments-per-sequence histogram.

    python benchmarks/bench_caps.py                      # L = 8192, caps 16 / 64 / 256, two short-document corpora
    python benchmarks/bench_caps.py --docs 300000 --caps 8,32

For each corpus (log-normal document lengths) and cap, best-fit packing in one process
(``bfd_layout``) and as the Spark job plans it (``plan_bfd``: 8 groups, 8 partitions, merge
rounds; the same steps Spark runs, in one process). Prints sequences, their cost against the
uncapped packing, the lower bound ``max(ceil(tokens / L), ceil(chunks / cap))``, the gap of the
distributed plan to one-process BFD with the same cap, mean fill, and segments per sequence
(median, 90th and 99th percentile, maximum).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bfpack_spark.packing.chunking import chunk_documents
from bfpack_spark.packing.layout import bfd_layout
from bfpack_spark.packing.reference import plan_bfd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--caps", default="16,64,256")
    parser.add_argument("--corpora", default="24:1.0,200:1.3", help="median:sigma of each corpus")
    parser.add_argument("--groups", type=int, default=8)
    args = parser.parse_args()
    L = args.seq_len
    caps = [None] + [int(c) for c in args.caps.split(",")]
    rng = np.random.default_rng(0)
    for spec in args.corpora.split(","):
        median, sigma = (float(x) for x in spec.split(":"))
        lengths = np.maximum(rng.lognormal(np.log(median), sigma, args.docs).astype(np.int64), 1)
        groups = np.repeat(np.arange(args.groups), -(-args.docs // args.groups))[: args.docs]
        chunks = len(chunk_documents(lengths, L))
        tokens = int(lengths.sum())
        print(f"\n== {args.docs:,} documents, median {median:g} tokens (sigma {sigma}), {tokens:,} tokens, L = {L}")
        print(f"{'cap':>6} {'sequences':>10} {'vs no cap':>10} {'lower bound':>12} {'plan':>10} {'plan gap':>9} "
              f"{'fill':>7} {'seg p50':>7} {'p90':>5} {'p99':>5} {'max':>5} {'s':>5}")
        base = None
        for cap in caps:
            t0 = time.perf_counter()
            layout = bfd_layout(lengths, L, cap)
            plan = plan_bfd(lengths, groups, args.groups, L, args.groups, max_segments=cap)
            seconds = time.perf_counter() - t0
            n = layout.n_sequences
            base = base or n
            segments = np.diff(layout.seg_offsets)
            bound = max(-(-tokens // L), -(-chunks // cap) if cap else 0)
            p50, p90, p99 = np.percentile(segments, [50, 90, 99]).astype(int)
            print(f"{cap or '-':>6} {n:>10,} {n / base - 1:>+10.2%} {bound:>12,} {plan.n_sequences:>10,} "
                  f"{plan.n_sequences / n - 1:>+9.4%} {tokens / (n * L):>7.2%} {p50:>7} {p90:>5} {p99:>5} "
                  f"{segments.max():>5} {seconds:>5.1f}")


if __name__ == "__main__":
    main()
