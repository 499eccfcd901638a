"""Many input files against few: the same documents packed from 8 files and from N files.

    python benchmarks/bench_many_files.py                        # every case below, three rounds each
    python benchmarks/bench_many_files.py --cases local:jsonl.gz:10000 --repeat 5
    python benchmarks/bench_many_files.py --cases s3:jsonl.gz:2000,incremental:local:10000

Web corpora come as tens of thousands of files. Each case packs one corpus (real text from this
machine's documentation and sources, cut into documents of about a kilobyte, with ids) laid out
as 8 files and as N files, ``bfpack pack`` in a fresh process each (JVM start included), the two
alternating, and prints the ratio many / few of each round and their median. Cases
(``--cases``, comma-separated):

- ``local:FORMAT:N``: files on local disk; FORMAT ``jsonl.gz`` or ``parquet``.
- ``s3:FORMAT:N``: the files on an S3 protocol server on loopback (moto), read through a proxy that
  waits ``--latency`` seconds (20 ms) before each reply's first byte, as a remote store does; the
  output on local disk. Also the requests per input file (counted by the proxy).
- ``incremental:WHERE:N``: a corpus of N files packed once, then 1% more files (new documents)
  packed with ``--mode incremental``: its time against packing the whole corpus from 8 files, and
  (through the proxy) the requests that touched a file the first run packed (expected: none).

For each run it prints the seconds from the command's start to the read stage's first task (the
"stage read" line), which is where planning and listing show.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the latency proxy of the tests

SUFFIXES = (".md", ".rst", ".txt", ".py", ".h")
DEFAULT_CASES = ("local:jsonl.gz:10000,local:jsonl.gz:100000,local:parquet:10000,local:parquet:100000,s3:jsonl.gz:2000,"
                 "incremental:local:10000,incremental:s3:10000")


def documents(mb: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(ids, texts): this machine's docs and sources cut at blank lines into documents of about a
    kilobyte (lognormal sizes), repeated with new ids until ``mb`` MB."""
    roots = sorted({"/usr/share/doc", sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]})
    texts: list[str] = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                if name.endswith(SUFFIXES):
                    try:
                        texts.append((Path(dirpath) / name).read_text(encoding="utf-8"))
                    except (OSError, UnicodeDecodeError):
                        pass
    rng = np.random.default_rng(seed)
    ids, docs, size, rep = [], [], 0, 0
    while size < mb * 2**20:
        for text in texts:
            paragraphs = text.split("\n\n")
            i = 0
            while i < len(paragraphs) and size < mb * 2**20:
                want = int(rng.lognormal(np.log(1024), 1.0))
                doc, i0 = [], i
                while i < len(paragraphs) and (sum(map(len, doc)) < want or i == i0):
                    doc.append(paragraphs[i])
                    i += 1
                body = "\n\n".join(doc).strip()
                if body:
                    ids.append(f"doc-{rep}-{len(ids)}")
                    docs.append(body)
                    size += len(body.encode())
        rep += 1
    return ids, docs


def write_layout(ids: list[str], texts: list[str], n_files: int, fmt: str, root: Path) -> Path:
    """The documents, in order, as ``n_files`` files of ``fmt`` under ``root`` (shards of a thousand files
    per directory, as dumps are laid out)."""
    root = root.with_name(f"{root.name}-{len(ids)}docs")  # a layout of this corpus, not of another --mb
    if (root / "_done").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    bounds = np.linspace(0, len(ids), n_files + 1).astype(int)
    for f in range(n_files):
        lo, hi = bounds[f], bounds[f + 1]
        path = root / f"{f // 1000:04d}" / f"part-{f:06d}.{fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "parquet":
            pq.write_table(pa.table({"id": ids[lo:hi], "text": texts[lo:hi]}), path, compression="zstd")
        else:
            data = "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(ids[lo:hi], texts[lo:hi]))
            path.write_bytes(gzip.compress(data.encode(), compresslevel=1))
    (root / "_done").touch()
    return root


#: another checkout of bfpack to run instead of this one (``--code``: the code before a change)
CODE: str | None = None


def bfpack(args: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """``bfpack pack ARGS`` in a fresh process: (seconds, seconds to the read stage, stderr)."""
    env = {**os.environ, **(env or {})}
    if CODE:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [CODE, env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    # with -m, Python puts the working directory first on the path: run where the code to measure is
    proc = subprocess.Popen([sys.executable, "-m", "bfpack_spark.cli", "pack", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=CODE)
    first_task, lines = float("nan"), []
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        if "stage read" in line and first_task != first_task:
            first_task = time.perf_counter() - t0
    proc.wait()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bfpack {' '.join(args)} failed:\n{''.join(lines)[-3000:]}")
    return seconds, first_task, "".join(lines)


class S3:
    """moto_server on a loopback port, and the latency proxy in front of it."""

    def __init__(self, latency: float):
        import socket

        import boto3
        from s3proxy import Faults, FaultyProxy

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-p", str(port)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                    "AWS_ALLOW_HTTP": "true", "AWS_EC2_METADATA_DISABLED": "true"}
        direct = f"http://127.0.0.1:{port}"
        self.client = boto3.client("s3", endpoint_url=direct, region_name="us-east-1",
                                   aws_access_key_id="testing", aws_secret_access_key="testing")
        for _ in range(100):
            try:
                self.client.list_buckets()
                break
            except Exception:
                time.sleep(0.1)
        self.faults = Faults(latency=latency)
        self.proxy = FaultyProxy(direct, self.faults).__enter__()
        self.env["AWS_ENDPOINT_URL"] = self.proxy.url
        self.buckets: set[str] = set()

    def upload(self, local: Path, bucket: str, prefix: str) -> str:
        if bucket not in self.buckets:
            self.client.create_bucket(Bucket=bucket)
            self.buckets.add(bucket)
        files = sorted(p for p in local.rglob("*") if p.is_file() and not p.name.startswith("_"))
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda p: self.client.put_object(Bucket=bucket, Key=f"{prefix}/{p.relative_to(local)}",
                                                           Body=p.read_bytes()), files))
        return f"s3://{bucket}/{prefix}"

    def close(self) -> None:
        self.proxy.__exit__(None, None, None)
        self.server.terminate()
        self.server.wait()


def pack_args(inputs: str, out: Path, *extra: str) -> list[str]:
    return ["--input", inputs, "--output", str(out), "--master", "local[2]", *extra]


def compare(name: str, few: str, many: str, out: Path, repeat: int, s3: S3 | None, n_files: int) -> dict:
    """Pack ``few`` and ``many`` alternately ``repeat`` times: each round's ratio many / few."""
    env = s3.env if s3 else None
    rounds = []
    for r in range(repeat):
        row = {}
        for label, inputs in (("few", few), ("many", many)) if r % 2 == 0 else (("many", many), ("few", few)):
            shutil.rmtree(out, ignore_errors=True)
            if s3:
                s3.faults.counts.update(requests=0)
                s3.faults.by_path.clear()
            seconds, first, _ = bfpack(pack_args(inputs, out), env)
            row[label] = {"seconds": seconds, "first_task": first}
            if s3:
                row[label]["requests"] = s3.faults.counts["requests"]
        row["ratio"] = row["many"]["seconds"] / row["few"]["seconds"]
        rounds.append(row)
        print(f"  {name} round {r + 1}: few {row['few']['seconds']:.1f}s (first task {row['few']['first_task']:.1f}s)"
              f", many {row['many']['seconds']:.1f}s (first task {row['many']['first_task']:.1f}s), "
              f"ratio {row['ratio']:.2f}" + (f"; requests {row['few']['requests']} / {row['many']['requests']} "
                                             f"({row['many']['requests'] / n_files:.2f} per file)" if s3 else ""),
              flush=True)
    result = {"case": name, "median_ratio": statistics.median(r["ratio"] for r in rounds),
              "few_s": statistics.median(r["few"]["seconds"] for r in rounds),
              "many_s": statistics.median(r["many"]["seconds"] for r in rounds),
              "few_first_task_s": statistics.median(r["few"]["first_task"] for r in rounds),
              "many_first_task_s": statistics.median(r["many"]["first_task"] for r in rounds)}
    if s3:
        result["requests_per_file"] = statistics.median(r["many"]["requests"] for r in rounds) / n_files
    print(f"{name}: many / few median {result['median_ratio']:.2f} ({result['many_s']:.1f}s / {result['few_s']:.1f}s)",
          flush=True)
    return result


def incremental(name: str, ids: list[str], texts: list[str], n_files: int, work: Path, repeat: int,
                s3: S3 | None) -> dict:
    """A corpus of ``n_files`` packed, then 1% more files packed incrementally, against the whole corpus
    (the same documents, the new ones included) packed from 8 files."""
    n_new = max(1, n_files // 100)
    per_file = len(ids) // n_files
    extra_ids = [f"new-{i}" for i in range(n_new * per_file)]
    extra_texts = texts[: len(extra_ids)]
    corpus = write_layout(ids, texts, n_files, "jsonl.gz", work / f"inc-{n_files}")
    added = write_layout(extra_ids, extra_texts, n_new, "jsonl.gz", work / f"inc-{n_files}-new")
    few = write_layout(ids + extra_ids, texts + extra_texts, 8, "jsonl.gz", work / f"inc-{n_files}-few")
    env = s3.env if s3 else None
    rounds = []
    for r in range(repeat):
        out, inputs = work / "out-inc", work / "inc-input"
        shutil.rmtree(out, ignore_errors=True)
        if s3:
            prefix = f"inc{r}"
            base = s3.upload(corpus, "bench", f"{prefix}/corpus")
            full = s3.upload(few, "bench", f"{prefix}/few")
            bfpack(pack_args(base, out), env)
            s3.upload(added, "bench", f"{prefix}/corpus/new")
            s3.faults.by_path.clear()
        else:
            shutil.rmtree(inputs, ignore_errors=True)
            shutil.copytree(corpus, inputs)
            base = str(inputs)
            full = str(few)
            bfpack(pack_args(base, out), env)
            shutil.copytree(added, inputs / "new")
        seconds, first, _ = bfpack(pack_args(base, out, "--mode", "incremental"), env)
        touched = 0
        if s3:
            touched = sum(n for path, n in s3.faults.by_path.items() if f"/{prefix}/corpus/" in path
                          and "/new/" not in path and path.endswith(".gz"))
        shutil.rmtree(work / "out-full", ignore_errors=True)
        whole, whole_first, _ = bfpack(pack_args(full, work / "out-full"), env)
        rounds.append({"incremental": seconds, "full": whole, "ratio": seconds / whole, "old_file_requests": touched})
        print(f"  {name} round {r + 1}: incremental ({n_new} new of {n_files + n_new}) {seconds:.1f}s "
              f"(first task {first:.1f}s), full pack from 8 files {whole:.1f}s, ratio {seconds / whole:.2f}"
              + (f"; requests on files packed before: {touched}" if s3 else ""), flush=True)
    result = {"case": name, "median_ratio": statistics.median(r["ratio"] for r in rounds),
              "incremental_s": statistics.median(r["incremental"] for r in rounds),
              "full_s": statistics.median(r["full"] for r in rounds),
              "old_file_requests": max(r["old_file_requests"] for r in rounds)}
    print(f"{name}: incremental / full median {result['median_ratio']:.2f}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=200, help="MB of text in the corpus (200: over 100,000 documents)")
    parser.add_argument("--incremental-mb", type=int, default=1000,
                        help="MB of text in the incremental cases' corpus: a run's fixed cost here (JVM, Spark's first "
                             "Python job) is about 13 s, which a corpus of 200 MB packs in not much more")
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.02, help="seconds before each S3 reply's first byte")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-many-files"))
    parser.add_argument("--code", help="run the bfpack of this checkout (a git worktree of another commit)")
    args = parser.parse_args()
    global CODE
    CODE = args.code
    args.workdir.mkdir(parents=True, exist_ok=True)
    corpora: dict[int, tuple[list[str], list[str]]] = {}

    def corpus(mb: int) -> tuple[list[str], list[str]]:
        if mb not in corpora:
            t0 = time.perf_counter()
            corpora[mb] = documents(mb)
            print(f"corpus: {len(corpora[mb][0]):,} documents, {sum(map(len, corpora[mb][1])) / 2**20:.0f} MB of "
                  f"text ({time.perf_counter() - t0:.0f}s to build)", flush=True)
        return corpora[mb]

    s3 = None
    results = []
    try:
        for case in args.cases.split(","):
            kind, *rest = case.split(":")
            if kind in ("s3",) or (kind == "incremental" and rest[0] == "s3"):
                s3 = s3 or S3(args.latency)
            if kind == "incremental":
                where, n = rest[0], int(rest[1])
                results.append(incremental(case, *corpus(args.incremental_mb), n, args.workdir, args.repeat,
                                           s3 if where == "s3" else None))
                continue
            fmt, n = rest[0], int(rest[1])
            ids, texts = corpus(args.mb)
            few = write_layout(ids, texts, 8, fmt, args.workdir / f"{fmt}-8")
            many = write_layout(ids, texts, n, fmt, args.workdir / f"{fmt}-{n}")
            if kind == "s3":
                few_uri = s3.upload(few, "bench", few.name) if s3 else ""
                many_uri = s3.upload(many, "bench", many.name) if s3 else ""
                results.append(compare(case, few_uri, many_uri, args.workdir / "out", args.repeat, s3, n))
            else:
                results.append(compare(case, str(few), str(many), args.workdir / "out", args.repeat, None, n))
    finally:
        if s3:
            s3.close()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
