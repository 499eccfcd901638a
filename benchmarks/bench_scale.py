"""Driver memory against corpus size: does anything on the driver grow with the documents?

    python benchmarks/bench_scale.py                       # 1M, 4M and 16M documents
    python benchmarks/bench_scale.py --sizes 1M,8M         # the sizes of the scale issue

For each size N it writes N short pre-tokenized documents (log-normal lengths around
24 tokens, 8 Parquet files), runs ``bfpack pack-tokenized`` on local[2] in a
subprocess, and samples every 0.2 s the resident memory of the driver's Python
process and of its JVM (Spark's Python workers are not the driver and are not
counted; in local mode the JVM is driver and executor at once, under ``--master
'local-cluster[2,1,4096]'`` executors get JVMs of their own and the JVM measured is the
driver's alone). It prints per size the wall time, the job's own per-stage seconds, both
peaks, and the sequences against the lower bound ceil(tokens / L); then the
driver's bytes per document: the slope of the Python peak between sizes.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

#: This benchmark on the code before the plan moved into Spark tasks (commit 2afaeaa, same machine,
#: 2026-11-26): driver Python peak RSS and wall time. The scale issue's own figures were 494 MB /
#: 46 s, 1,137 MB / 103 s and 1,780 MB / 177 s.
BEFORE = {1_000_000: (515e6, 48.0), 4_000_000: (1_190e6, 87.0), 8_000_000: (1_975e6, 149.0)}


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1_000, "M": 1_000_000, "G": 1_000_000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * scale)


def write_corpus(root: Path, n_docs: int, n_files: int = 8, seed: int = 0) -> int:
    """N documents with log-normal lengths around 24 tokens; returns the token count."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    tokens = 0
    for f, part in enumerate(np.array_split(np.arange(n_docs), n_files)):
        lengths = np.maximum(rng.lognormal(np.log(24), 0.6, part.shape[0]).astype(np.int64), 1)
        offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
        values = rng.integers(0, 100_000, int(offsets[-1]), dtype=np.int32)
        ids = pc.binary_join_element_wise("doc-", pc.cast(pa.array(part), pa.string()), "")
        pq.write_table(pa.table({"id": ids, "tokens": pa.ListArray.from_arrays(pa.array(offsets),
                                                                              pa.array(values))}),
                       root / f"part-{f:02d}.parquet", row_group_size=262_144)
        tokens += int(offsets[-1])
    return tokens


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def _is_jvm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"java" in fh.read().split(b"\0")[0]
    except OSError:
        return False


def run_pack(corpus: Path, out: Path, seq_len: int, master: str, extra: list[str]) -> dict:
    """Run the job; sample the driver Python process and the JVM it starts."""
    cmd = [sys.executable, "-m", "bfpack_spark.cli", "pack-tokenized", "-q", "--input", str(corpus),
           "--output", str(out), "--seq-len", str(seq_len), "--master", master, *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    py_peak = jvm_peak = 0
    while proc.poll() is None:
        py_peak = max(py_peak, _rss(proc.pid))
        jvms = [c for c in _children(proc.pid) if _is_jvm(c)]
        for jvm in jvms:
            jvm_peak = max(jvm_peak, _rss(jvm))
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bfpack failed ({proc.returncode}): {stderr[-2000:]}")
    stages = re.search(r"^time: [\d.]+s \((.*)\)$", stdout, re.M)
    return {"wall": wall, "python_peak": py_peak, "jvm_peak": jvm_peak,
            "stages": stages.group(1) if stages else "", "stats": _stats(out)}


def _stats(out: Path) -> dict:
    from deltalake import DeltaTable

    files = DeltaTable(str(out / "stats")).file_uris()
    return ds.dataset(files, format="parquet").to_table().to_pylist()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1M,4M,16M", help="comma-separated document counts (K, M suffixes)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--master", default="local[2]",
                        help="local[2]: the JVM is driver and executor at once; 'local-cluster[2,1,4096]': "
                             "executors in their own JVMs, so the JVM measured is the driver's alone")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory, removed at the end")
    parser.add_argument("--keep", action="store_true", help="keep the corpora and outputs")
    args, extra = parser.parse_known_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bfpack-scale-"))
    rows = []
    try:
        for n in sizes:
            corpus, out = work / f"corpus-{n}", work / f"out-{n}"
            t0 = time.perf_counter()
            tokens = write_corpus(corpus, n)
            print(f"\n== {n:,} documents, {tokens:,} tokens (written in {time.perf_counter() - t0:.0f}s)", flush=True)
            r = run_pack(corpus, out, args.seq_len, args.master, extra)
            s = r["stats"]
            over = s["sequences"] - s["lower_bound"]
            print(f"wall {r['wall']:.1f}s; driver Python peak {r['python_peak'] / 1e6:,.0f} MB, JVM peak "
                  f"{r['jvm_peak'] / 1e6:,.0f} MB\nstages: {r['stages']}\nsequences {s['sequences']:,}, lower "
                  f"bound {s['lower_bound']:,} (+{over}, {over / max(1, s['lower_bound']):.5%})", flush=True)
            rows.append((n, r))
            if not args.keep:
                shutil.rmtree(corpus, ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print("\n| documents | wall | driver Python peak | driver JVM peak | sequences over lower bound "
          "| before: Python peak, wall |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n, r in rows:
        s = r["stats"]
        before = BEFORE.get(n)
        b = f"{before[0] / 1e6:,.0f} MB, {before[1]:.0f} s" if before else "-"
        over = s["sequences"] - s["lower_bound"]
        print(f"| {n:,} | {r['wall']:.0f} s | {r['python_peak'] / 1e6:,.0f} MB | {r['jvm_peak'] / 1e6:,.0f} MB "
              f"| +{over} ({over / max(1, s['lower_bound']):.4%}) | {b} |")
    for (n0, r0), (n1, r1) in zip(rows, rows[1:]):
        slope = (r1["python_peak"] - r0["python_peak"]) / (n1 - n0)
        jslope = (r1["jvm_peak"] - r0["jvm_peak"]) / (n1 - n0)
        print(f"driver Python bytes per document, {n0:,} -> {n1:,}: {slope:.1f} (JVM: {jslope:.1f})")


if __name__ == "__main__":
    main()
