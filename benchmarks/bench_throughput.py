"""Cost per token: bfpack end to end against tokenizing alone, on the same text.

    python benchmarks/bench_throughput.py                  # 500 MB of JSON lines, all cores
    python benchmarks/bench_throughput.py --cores 1        # one core (JVM start weighs less)
    python benchmarks/bench_throughput.py --mb 150 --skip tokenized
    python benchmarks/bench_throughput.py --skip concat,tokenized --json-mb 100   # the engines' figures

The corpus is built from text every machine has: the sources, headers and docs of the
running Python and its installed packages, /usr/include and /usr/share/doc, one JSON
object per file ({"id", "text"}), repeated (with new ids) until it reaches ``--mb``. In
the same run it measures:

(a) the tokenize-only floor: tiktoken (``encode_ordinary_batch``) in ``--cores`` processes,
    JSON parsing included, nothing else; beside it the fast engine's own floor (bfpack's
    ``encode_texts`` with gigatoken, the same way);
(b) ``bfpack pack`` end to end (a fresh process: JVM start included), best-fit;
(c) the same with ``--strategy concat``;
(d) ``bfpack pack-tokenized`` on the corpus already tokenized, against a plain Spark read
    plus write of the same token lists to Parquet (also a fresh process);
(f) with ``--json-mb N`` (0: skip): the same comparison for a tokenizer.json, on a corpus of N MB:
    a Llama 3 style tokenizer.json (built offline from cl100k_base's ranks by transformers'
    converter), HF ``tokenizers`` (``encode_batch_fast``) as the floor, the fast engine's floor,
    and ``bfpack pack --tokenizer tokenizer.json``;
(e) with ``--s3``: (b) with its output root (tables and workspace) on a local S3 server
    (moto_server on loopback), against (b) to local disk. A loopback server is not AWS: it
    measures the cost of going through the S3 protocol, not a network's.

It prints tokens per second per core, each ratio, and the job's per-stage seconds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

SUFFIXES = (".py", ".pyi", ".h", ".hpp", ".c", ".md", ".rst", ".txt", ".java")
FILE_MB = 64


def _sources() -> list[Path]:
    roots = {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
             "/usr/include", "/usr/share/doc", "/usr/lib/python3"}
    files = []
    for root in sorted(roots):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(SUFFIXES))
    return files


def write_corpus(root: Path, mb: int) -> int:
    """JSON-lines files of about FILE_MB each until ``mb`` MB are written; returns the documents."""
    root.mkdir(parents=True, exist_ok=True)
    texts = []
    for path in _sources():
        try:
            texts.append((str(path), path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            continue
    written = n_docs = part = 0
    out = None
    repeat = 0
    while written < mb * 2**20:
        for name, text in texts:
            if out is None or out.tell() > FILE_MB * 2**20:
                if out is not None:
                    out.close()
                out = open(root / f"part-{part:03d}.jsonl", "w", encoding="utf-8")
                part += 1
            line = json.dumps({"id": f"{name}#{repeat}", "text": text}) + "\n"
            out.write(line)
            written += len(line.encode())
            n_docs += 1
            if written >= mb * 2**20:
                break
        repeat += 1
    out.close()
    return n_docs


def _tokenize_file(job: tuple[str, str, str]) -> int:
    """Tokens (with an EOS per document, as bfpack counts) of one file; one thread per process.
    ``engine``: tiktoken or tokenizers (the references), or fast (bfpack's encode_texts, gigatoken)."""
    path, engine, spec = job
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # HF tokenizers: one thread, as tiktoken's num_threads=1
    if engine == "tiktoken":
        import tiktoken

        encoding = tiktoken.get_encoding(spec)
        count = lambda batch: sum(len(t) + 1 for t in encoding.encode_ordinary_batch(batch, num_threads=1))  # noqa: E731
    elif engine == "tokenizers":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(spec)
        count = lambda batch: sum(len(e.ids) + 1 for e in tok.encode_batch_fast(batch, add_special_tokens=False))  # noqa: E731
    else:
        from bfpack_spark.tokenize import encode_texts, load_tokenizer

        tokenizer = load_tokenizer(spec, engine="auto")
        assert tokenizer.fast is not None, f"no proven fast engine for {spec}"
        count = lambda batch: len(encode_texts(tokenizer, batch).values) + len(batch)  # noqa: E731
    n = 0
    batch: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            batch.append(json.loads(line)["text"])
            if len(batch) == 1024:
                n += count(batch)
                batch = []
    return n + count(batch)


def tokenize_only(corpus: Path, cores: int, engine: str = "tiktoken", spec: str | None = None) -> tuple[float, int]:
    """(a): seconds and tokens for the tokenizer alone, in ``cores`` processes."""
    from bfpack_spark.constants import DEFAULT_TOKENIZER

    jobs = [(str(p), engine, spec or DEFAULT_TOKENIZER) for p in sorted(corpus.glob("*.jsonl"))]
    with multiprocessing.get_context("spawn").Pool(cores) as pool:
        pool.map(_tokenize_file, [(j[0], engine, j[2]) for j in jobs[:cores]])  # load the tokenizer everywhere first
        t0 = time.perf_counter()
        tokens = sum(pool.map(_tokenize_file, jobs, chunksize=1))
        return time.perf_counter() - t0, tokens


def llama3_style_tokenizer(path: Path) -> Path:
    """A tokenizer.json shaped as Llama 3's, with cl100k_base's ranks (transformers' converter, offline)."""
    import tiktoken_ext
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken"
    converter = TikTokenConverter(vocab_file=str(ranks), extra_special_tokens=["<|begin_of_text|>", "<|end_of_text|>"])
    converter.converted().save(str(path))
    return path


def _bfpack(args: list[str], cores: int) -> tuple[float, dict]:
    """Run the CLI in a fresh process; its wall time and its stats row."""
    from bfpack_spark.io.tables.read import snapshot_dataset

    out = args[args.index("--output") + 1]
    local = "://" not in out
    if local:
        shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bfpack_spark.cli", *args, "-q", "--master", f"local[{cores}]"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"bfpack failed: {done.stderr[-3000:]}")
    stats = snapshot_dataset(f"{out}/stats").to_table().to_pylist()[0]
    if local:
        shutil.rmtree(out, ignore_errors=True)
    return seconds, stats


def s3_server() -> subprocess.Popen:
    """moto_server on a free loopback port, selected through the AWS_* environment; bucket ``bench``."""
    import socket

    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"})
    for _ in range(100):
        try:
            boto3.client("s3").create_bucket(Bucket="bench")
            return server
        except Exception:
            time.sleep(0.1)
    raise SystemExit("moto_server did not start")


_PLAIN = """
import sys, time
t0 = time.perf_counter()
from bfpack_spark.spark.session import get_spark
spark = get_spark(sys.argv[3], "plain", {"spark.ui.showConsoleProgress": "false"})
spark.read.parquet(sys.argv[1]).write.mode("overwrite").parquet(sys.argv[2])
print(time.perf_counter() - t0)
"""


def plain_spark(src: Path, dst: Path, cores: int) -> float:
    """(d)'s baseline: a fresh process that starts Spark, reads the token lists and writes them."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PLAIN, str(src), str(dst), f"local[{cores}]"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"plain Spark failed: {done.stderr[-3000:]}")
    shutil.rmtree(dst, ignore_errors=True)
    return time.perf_counter() - t0


def write_tokenized(corpus: Path, dst: Path) -> None:
    """The corpus as Parquet files of (id, tokens), tokenized as bfpack does (EOS appended)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bfpack_spark.constants import DEFAULT_TOKENIZER
    from bfpack_spark.tokenize import encode_texts, load_tokenizer

    tokenizer = load_tokenizer(DEFAULT_TOKENIZER)
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(corpus.glob("*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh]
        tokens = encode_texts(tokenizer, [r["text"] for r in records], True)
        keep = np.asarray(pa.compute.list_value_length(tokens)) > 1
        pq.write_table(pa.table({"id": [r["id"] for r in records], "tokens": tokens}).filter(pa.array(keep)),
                       dst / f"{path.stem}.parquet", row_group_size=4096)


def stages(stats: dict) -> str:
    return ", ".join(f"{k} {v:.1f}s" for k, v in sorted(dict(stats["stage_seconds"]).items(), key=lambda kv: -kv[1])
                     if v >= 0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=500, help="size of the JSON-lines corpus")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--workdir", default=None, help="keep the corpus here between runs")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: concat, tokenized")
    parser.add_argument("--s3", action="store_true", help="also (e): output to a local S3 server")
    parser.add_argument("--json-mb", type=int, default=100, help="(f): size of the tokenizer.json corpus (0: skip)")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bfpack-throughput-"))
    corpus = work / f"corpus-{args.mb}mb"
    if not corpus.exists():
        t0 = time.perf_counter()
        n = write_corpus(corpus, args.mb)
        print(f"corpus: {n:,} documents, {args.mb} MB of JSON lines in {len(list(corpus.glob('*.jsonl')))} "
              f"files, written in {time.perf_counter() - t0:.0f}s")
    c = args.cores
    floor, tokens = tokenize_only(corpus, c)
    rate = lambda seconds: tokens / seconds / c / 1e6  # noqa: E731  M tokens/s per core
    print(f"\n(a) tokenize only, {c} processes: tiktoken {floor:.1f}s, {tokens:,} tokens, "
          f"{rate(floor):.2f} M tok/s per core")
    fast_floor, fast_tokens = tokenize_only(corpus, c, "fast")
    print(f"    the fast engine alone: {fast_floor:.1f}s ({floor / fast_floor:.1f}x faster than tiktoken)"
          + ("" if fast_tokens == tokens else f"; {fast_tokens:,} tokens: NOT tiktoken's count"))
    out = str(work / "out")
    wall, stats = _bfpack(["pack", "--input", str(corpus), "--output", out], c)
    print(f"(b) bfpack pack (best-fit, engine {stats.get('tokenizer_engine')}): {wall:.1f}s, "
          f"{rate(wall):.2f} M tok/s per core, {wall / floor:.2f}x the tiktoken floor, "
          f"{wall / fast_floor:.2f}x the engine's\n    stages: {stages(stats)}")
    if stats["tokens"] != tokens:
        print(f"    note: bfpack packed {stats['tokens']:,} tokens ({stats['documents_rejected']} rejects)")
    if "concat" not in skip:
        wall_c, stats_c = _bfpack(["pack", "--input", str(corpus), "--output", out, "--strategy", "concat"], c)
        print(f"(c) bfpack pack --strategy concat: {wall_c:.1f}s, {wall_c / floor:.2f}x the floor; "
              f"best-fit / concat {wall / wall_c:.2f}\n    stages: {stages(stats_c)}")
    if "tokenized" not in skip:
        tokenized = work / f"tokenized-{args.mb}mb"
        if not tokenized.exists():
            write_tokenized(corpus, tokenized)
        plain = plain_spark(tokenized, work / "plain", c)
        wall_t, stats_t = _bfpack(["pack-tokenized", "--input", str(tokenized), "--output", out], c)
        print(f"(d) bfpack pack-tokenized: {wall_t:.1f}s; plain Spark read + write of the token lists: "
              f"{plain:.1f}s; ratio {wall_t / plain:.2f}\n    stages: {stages(stats_t)}")
    if args.json_mb:
        json_corpus = work / f"corpus-{args.json_mb}mb"
        if not json_corpus.exists():
            write_corpus(json_corpus, args.json_mb)
        spec = str(llama3_style_tokenizer(work / "tokenizer.json"))
        hf, hf_tokens = tokenize_only(json_corpus, c, "tokenizers", spec)
        fast_hf, _ = tokenize_only(json_corpus, c, "fast", spec)
        wall_j, stats_j = _bfpack(["pack", "--input", str(json_corpus), "--output", out, "--tokenizer", spec], c)
        print(f"(f) tokenizer.json (Llama 3 style), {args.json_mb} MB, {hf_tokens:,} tokens: HF tokenizers alone "
              f"{hf:.1f}s; the fast engine alone {fast_hf:.1f}s; bfpack pack "
              f"(engine {stats_j.get('tokenizer_engine')}) {wall_j:.1f}s, {wall_j / hf:.2f}x the HF tokenizers floor"
              f"\n    stages: {stages(stats_j)}")
    if args.s3:
        server = s3_server()
        try:
            wall_s, stats_s = _bfpack(["pack", "--input", str(corpus), "--output", "s3://bench/out"], c)
        finally:
            server.terminate()
        print(f"(e) bfpack pack to s3:// (moto_server on loopback): {wall_s:.1f}s; to local disk (b) {wall:.1f}s; "
              f"ratio {wall_s / wall:.2f}\n    stages: {stages(stats_s)}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
