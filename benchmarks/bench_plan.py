"""Which way of dealing chunks to packing partitions: tightness against token movement.

    python benchmarks/bench_plan.py            # about 2 minutes, one core, no Spark
    python benchmarks/bench_plan.py --quick    # smaller corpora

Runs the distributed plan in one process (``packing.reference.plan_bfd``, the same steps
Spark runs in its tasks) with several dealing schemes on corpora that stress them,
and prints, per scheme, the sequences against one-process BFD over the whole corpus
and against the lower bound ceil(tokens / L), the share of tokens whose sequence
mixes groups (they cross the network once), the residual items, and the driver's
state (sources x buckets counts).

Schemes:
- exact-length strata: one bucket per length (what the plan did before it ran in Spark
  tasks; its driver state is groups x L);
- linear buckets (1024, 256, 64, 16) with the golden-ratio interleave within a bucket;
- 256 buckets without the interleave (a target gets the same end of every bucket);
- in place only: every group packs its own items, then a stratified residual merge.
"""

from __future__ import annotations

import argparse

import numpy as np

from bfpack_spark.packing.layout import bfd_layout
from bfpack_spark.packing.reference import plan_bfd


def lognormal(n: int, median: float, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.maximum(rng.lognormal(np.log(median), sigma, n).astype(np.int64), 1)


def corpora(scale: float):
    n = lambda k: int(k * scale)  # noqa: E731
    yield "random order, median 300 (the pipeline benchmark's), 8 groups", lognormal(n(1e6), 300, 1.2, 0), 8, 2048
    yield "random order, median 300, 64 groups", lognormal(n(1e6), 300, 1.2, 1), 64, 2048
    yield "length-sorted, median 500, 8 groups", np.sort(lognormal(n(3e5), 500, 1.2, 2)), 8, 2048
    yield "short (median 24), length-sorted, 10 groups", np.sort(lognormal(n(1e6), 24, 0.8, 3)), 10, 2048
    yield "narrow around L/2 (median 1500, sigma 0.5), 8 groups", lognormal(n(1e6), 1500, 0.5, 4), 8, 2048
    yield "L = 8192, length-sorted, median 2000, 8 groups", np.sort(lognormal(n(5e5), 2000, 1.2, 8)), 8, 8192


SCHEMES = [
    ("exact-length strata", dict(n_buckets=10**9)),
    ("1024 linear buckets", dict(n_buckets=1024)),
    ("256 linear buckets (default)", dict(n_buckets=256)),
    ("64 linear buckets", dict(n_buckets=64)),
    ("16 linear buckets", dict(n_buckets=16)),
    ("256 buckets, no interleave", dict(n_buckets=256, interleave=False)),
    ("in place only, then merge", dict(n_buckets=256, route=False)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="corpora a tenth of the size")
    args = parser.parse_args()
    for name, lengths, groups, seq_len in corpora(0.1 if args.quick else 1.0):
        group = np.arange(lengths.shape[0]) * groups // lengths.shape[0]
        one = bfd_layout(lengths, seq_len).n_sequences
        lower = -(-int(lengths.sum()) // seq_len)
        print(f"\n### {name}: {lengths.shape[0]:,} documents, L = {seq_len}")
        print(f"one-process BFD: {one:,} sequences, lower bound {lower:,}\n")
        print("| scheme | sequences - BFD | sequences - lower bound | tokens moved | residual items "
              "| driver counts |")
        print("| --- | --- | --- | --- | --- | --- |")
        for label, kwargs in SCHEMES:
            plan = plan_bfd(lengths, group, groups, seq_len, groups, **kwargs)
            moved = plan.length[~plan.local].sum() / plan.length.sum()
            counts = groups * min(kwargs["n_buckets"], seq_len)
            print(f"| {label} | {plan.n_sequences - one:+,} ({(plan.n_sequences - one) / one:+.4%}) "
                  f"| {plan.n_sequences - lower:+,} | {moved:.1%} | {plan.residual_items:,} | {counts:,} |")


if __name__ == "__main__":
    main()
