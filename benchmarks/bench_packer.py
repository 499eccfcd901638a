"""Benchmark of the packing core, against TRL and against memory bandwidth, in one run.

    python benchmarks/bench_packer.py              # full size (10M items; 300k documents)
    python benchmarks/bench_packer.py --quick      # a smaller smoke run

Part 1: ``best_fit_decreasing`` on 10 million items (chunks of log-normal documents)
at L=2048 and L=8192: cold compile time, cached load time, steady-state items/s,
sequences vs the lower bound.

Part 2: the same 300,000 tokenized documents (~370M tokens) packed Arrow-to-Arrow by
``pack_token_lists`` and, when TRL is installed (``pip install -e .[bench]``), by TRL's
``pack_dataset(strategy="bfd_split")`` over the whole dataset in one batch. Prints the
speed ratio, the sequence counts, and our time over one numpy copy of the token buffer.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bfpack_spark.packing import best_fit_decreasing, chunk_documents, pack_token_lists


def lognormal_lengths(n: int, median: float, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.maximum(rng.lognormal(np.log(median), sigma, n).astype(np.int64), 1)


def items_for(n_items: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """``n_items`` chunk lengths of long-tailed documents, as the packer sees them."""
    lengths = lognormal_lengths(n_items, 600, 1.2, seed)
    return chunk_documents(lengths, seq_len).length[:n_items].copy()


def best_of(repeats: int, fn) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def first_call_seconds(cache_dir: str) -> float:
    """Time of the first BFD call in a fresh interpreter using ``cache_dir`` as numba cache."""
    code = (
        "import time, numpy as np\n"
        "t0 = time.perf_counter()\n"
        "from bfpack_spark.packing import best_fit_decreasing\n"
        "best_fit_decreasing(np.array([3, 2, 1]), 4)\n"
        "print(time.perf_counter() - t0)\n"
    )
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def bench_kernel(n_items: int, repeats: int) -> None:
    print(f"== best_fit_decreasing: {n_items:,} items, log-normal documents (median 600, sigma 1.2)")
    with tempfile.TemporaryDirectory() as cache:
        cold = first_call_seconds(cache)
        warm = first_call_seconds(cache)
    print(f"import + first call: {cold:.2f}s with an empty numba cache (compile), "
          f"{warm:.2f}s from the on-disk cache")
    for seq_len in (2048, 8192):
        items = items_for(n_items, seq_len)
        best_fit_decreasing(items[:100], seq_len)
        seconds, seqs = best_of(repeats, lambda x=items, n=seq_len: best_fit_decreasing(x, n))
        n_seqs = int(seqs.max()) + 1
        lower = -(-int(items.sum()) // seq_len)
        print(f"L={seq_len}: {n_items / seconds / 1e6:.2f} M items/s ({seconds:.3f}s, best of {repeats}); "
              f"sequences {n_seqs:,} vs lower bound {lower:,}: +{n_seqs - lower} "
              f"({(n_seqs - lower) / lower:.5%})")


def synthetic_corpus(n_docs: int, seed: int = 0) -> pa.Array:
    lengths = lognormal_lengths(n_docs, 600, 1.2, seed)
    rng = np.random.default_rng(seed + 1)
    values = rng.integers(0, 100_000, int(lengths.sum()), dtype=np.int32)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def trl_pack(tokens: pa.Array, seq_len: int, repeats: int):
    """TRL's bfd_split over the whole dataset in one batch: (seconds, sequences, tokens) or None."""
    try:
        import datasets
        from datasets.table import InMemoryTable
        from trl.data_utils import pack_dataset
    except ImportError:
        return None
    datasets.disable_progress_bars()
    # A fixed fingerprint keeps datasets from hashing the whole table (~15 s, not packing).
    dataset = datasets.Dataset(InMemoryTable(pa.table({"input_ids": tokens})), fingerprint="bench")
    map_kwargs = {"batch_size": None}  # one batch: bins may hold documents from anywhere
    pack_dataset(dataset.select(range(100)), seq_len, strategy="bfd_split", map_kwargs=map_kwargs)
    seconds, packed = best_of(repeats, lambda: pack_dataset(dataset, seq_len, strategy="bfd_split",
                                                             map_kwargs=map_kwargs))
    lengths = packed.data.table.column("seq_lengths")
    n_tokens = int(pc.sum(pc.list_flatten(lengths)).as_py())
    return seconds, packed.num_rows, n_tokens


def bench_arrow(n_docs: int, repeats: int, seq_len: int = 2048) -> None:
    tokens = synthetic_corpus(n_docs)
    values = tokens.values.to_numpy()
    n_tokens = len(values)
    print(f"\n== Arrow-to-Arrow packing: {n_docs:,} documents, {n_tokens:,} tokens, L={seq_len}")
    pack_token_lists(tokens.slice(0, 100), seq_len)
    ours, table = best_of(repeats, lambda: pack_token_lists(tokens, seq_len))
    copy, _ = best_of(repeats, lambda: values.copy())
    lower = -(-n_tokens // seq_len)
    print(f"bfpack pack_token_lists: {ours:.3f}s ({n_docs / ours:,.0f} docs/s), "
          f"{table.num_rows:,} sequences (lower bound {lower:,})")
    print(f"numpy copy of the token buffer ({values.nbytes / 1e9:.2f} GB): {copy:.3f}s")
    print(f"ratio ours / numpy copy: {ours / copy:.2f}x (target <= 4)")
    assert int(np.asarray(table["n_tokens"]).sum()) == n_tokens

    trl = trl_pack(tokens, seq_len, repeats)
    if trl is None:
        print("TRL not installed (pip install -e .[bench]): TRL comparison skipped")
        return
    trl_seconds, trl_seqs, trl_tokens = trl
    print(f"TRL pack_dataset(strategy='bfd_split'), one batch: {trl_seconds:.3f}s "
          f"({n_docs / trl_seconds:,.0f} docs/s), {trl_seqs:,} sequences, {trl_tokens:,} tokens")
    print(f"speed-up over TRL: {trl_seconds / ours:.1f}x (target >= 5); "
          f"sequences ours - TRL: {table.num_rows - trl_seqs:+,} (target <= 0)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=10_000_000)
    parser.add_argument("--docs", type=int, default=300_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1M items, 30k documents")
    args = parser.parse_args()
    if args.quick:
        args.items, args.docs = 1_000_000, 30_000
    bench_kernel(args.items, args.repeats)
    bench_arrow(args.docs, args.repeats)


if __name__ == "__main__":
    main()
