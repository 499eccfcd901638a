"""The driver's cost per input file: listing and planning a million files, time and memory.

    python benchmarks/bench_listing.py                      # 1,000,000 files
    python benchmarks/bench_listing.py --files 100000 --workdir /tmp/listing

It writes ``--files`` small JSON-lines files (a thousand per directory, as dumps are laid out),
then, in a fresh process, runs the job's first stage (tokenizer check, listing, the first file's
columns, groups, and the groups' payloads for the read tasks) and reports its seconds and the
process's peak memory above what it held before the stage (ru_maxrss), per input file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

STAGE = """
import json, resource, sys, time
from bfpack_spark.config import load_config
from bfpack_spark.stages.inputs import plan_inputs
import bfpack_spark.tokenize, pyarrow, numpy  # loaded before the baseline
config = load_config(None, {"input.paths": [sys.argv[1]], "output.output": sys.argv[2]})
from bfpack_spark.tokenize import load_tokenizer
load_tokenizer(config.tokenizer.tokenizer, None, None, "reference")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
plan = plan_inputs(config)
payloads = plan.group_payloads()
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"files": len(plan.listing), "groups": plan.n_groups, "seconds": seconds,
                  "peak_kb_above_baseline": peak - before, "baseline_kb": before,
                  "payload_bytes": sum(map(len, payloads)), "listing_bytes": plan.listing.table.nbytes}))
"""


def write_files(root: Path, n: int) -> None:
    if (root / "_done").exists():
        return
    line = b'{"id": "x", "text": "a small document"}\n'
    for i in range(n):
        d = root / f"{i // 1000:05d}"
        if i % 1000 == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"part-{i:07d}.jsonl").write_bytes(line)
    (root / "_done").touch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-listing"))
    args = parser.parse_args()
    root = args.workdir / f"files-{args.files}"
    t0 = time.perf_counter()
    write_files(root, args.files)
    print(f"{args.files:,} files under {root} ({time.perf_counter() - t0:.0f}s to write)", flush=True)
    done = subprocess.run([sys.executable, "-c", STAGE, str(root), str(args.workdir / "out")], capture_output=True,
                          text=True, check=True)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    per_file = figures["peak_kb_above_baseline"] * 1024 / figures["files"]
    print(f"inputs stage: {figures['files']:,} files in {figures['groups']:,} groups, {figures['seconds']:.1f}s "
          f"({figures['seconds'] / figures['files'] * 1e6:.1f} us per file); driver peak "
          f"{figures['peak_kb_above_baseline'] / 1024:.0f} MB above its {figures['baseline_kb'] / 1024:.0f} MB "
          f"({per_file:.0f} bytes per file); listing {figures['listing_bytes'] / 2**20:.0f} MB as columns, "
          f"the read tasks' payloads {figures['payload_bytes'] / 2**20:.1f} MB")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
