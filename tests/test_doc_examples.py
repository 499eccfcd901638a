"""Every shell command and Python example of the README and the docs site, run as written where
this machine can, and the outputs they show compared with what they print.

The blocks run in a scratch directory laid out as the docs assume: the repository's ``.venv``,
``conf/`` and ``jobs/``, the demo's output in ``out/demo`` (made there, and its printed summary
compared with the README's), and the small inputs the commands name (``corpus/``,
``tokens.parquet``, ``corpus.jsonl.zst``, tokenizer files, ``chat.jsonl``, ``sft.parquet``, S3
buckets on the test S3 server). What cannot run here is listed in ``NOT_HERE`` with the reason;
the cron line runs without its schedule and must fail only on its absent input directory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpora import bos_tokenizer, write_jsonl

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
#: the README and every page of the docs site (the benchmark results are BENCHMARKS.md, a record)
PAGES = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").rglob("*.md") if not p.is_symlink())
VENV = Path(sys.executable).parent.parent

#: commands that need what this machine has not, by their first words, and why
NOT_HERE = {
    "python3 -m venv": "the Quick start: CI runs it (.ci/run)",
    ".venv/bin/python -m pytest": "the test suite itself",
    "aws ": "needs an AWS account",
    "spark-submit --deploy-mode cluster": "needs an EMR cluster",
    "docker ": "docker/build-and-smoke.sh builds and runs the image (podman)",
    ".venv/bin/python benchmarks/": "benchmarks take minutes; BENCHMARKS.md has their figures",
    ".venv/bin/pip install": "installs extras the test extra already holds",
    "torchrun --nproc_per_node 8 pretrain_gpt.py": "needs a Megatron-LM checkout and GPUs",
}
CRON = re.compile(r"^[0-9*/,-]+ [0-9*/,-]+ [0-9*/,-]+ [0-9*/,-]+ [0-9*/,-]+ ")


def blocks(lang: str) -> list[tuple[str, str]]:
    """(page:line, text) of the fenced blocks in ``lang`` of every page."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for m in re.finditer(rf"^ *```{lang}\n(.*?)^ *```", text, re.S | re.M):
            body = re.sub(r"^ {2}", "", m.group(1), flags=re.M) if m.group(0).startswith(" ") else m.group(1)
            found.append((f"{page.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}", body))
    return found


def shown_output(text: str) -> list[str]:
    """The lines an output block shows, without the ``...`` that stand for lines left out."""
    return [line.rstrip() for line in text.splitlines() if line.strip() and line.strip() != "..."]


def printed_as_shown(shown: str, printed: str) -> bool:
    """Every line shown appears in what was printed, in the same order."""
    lines = iter(line.rstrip() for line in printed.splitlines())
    return all(any(line == want for line in lines) for want in shown_output(shown))


def commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", "", block)
    out = []
    for raw in text.splitlines():
        line = re.sub(r"\s+#\s.*$", "", raw).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, s3_server):
    """A directory laid out as the README assumes, with its inputs; S3 buckets on the test server."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    w = tmp_path_factory.mktemp("readme")
    for name in (".venv", "conf", "jobs", "benchmarks"):
        (w / name).symlink_to(VENV if name == ".venv" else ROOT / name)
    (w / "out").mkdir()
    demo = run(w, ".venv/bin/bfpack demo -q")
    assert demo.returncode == 0, demo.stderr[-3000:]
    (w / "demo-summary.txt").write_text(demo.stdout)
    texts = [f"document {i}: " + "some words of text " * (3 + i % 40) for i in range(120)]
    (w / "corpus").mkdir()
    write_jsonl(w / "corpus" / "a.jsonl", [{"id": f"a{i}", "text": t} for i, t in enumerate(texts[:60])])
    write_jsonl(w / "corpus" / "b.jsonl", [{"id": f"b{i}", "text": t} for i, t in enumerate(texts[60:])])
    with pa.CompressedOutputStream(str(w / "corpus.jsonl.zst"), "zstd") as fh:
        fh.write("".join(json.dumps({"id": f"z{i}", "text": t}) + "\n" for i, t in enumerate(texts)).encode())
    pq.write_table(pa.table({"id": [f"t{i}" for i in range(50)],
                             "input_ids": [list(range(1, 10 + 37 * i)) for i in range(50)]}), w / "tokens.parquet")
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, special_tokens=["[UNK]", "<|endoftext|>"]))
    (w / "path" / "to").mkdir(parents=True)
    tok.save(str(w / "path" / "to" / "tokenizer.json"))
    (w / "path" / "to" / "llama3").mkdir()
    bos_tokenizer(w / "path" / "to" / "llama3" / "tokenizer.json", texts, bos="<|begin_of_text|>",
                  eos="<|end_of_text|>")
    write_jsonl(w / "chat.jsonl", [{"id": f"c{i}", "prompt": f"Question {i}: what follows {i}?",
                                    "response": t} for i, t in enumerate(texts[:40])])
    pq.write_table(pa.table({"id": [f"s{i}" for i in range(30)],
                             "input_ids": [list(range(5, 20 + 11 * i)) for i in range(30)],
                             "loss_mask": [[0] * (3 + i) + [1] * (12 + 10 * i) for i in range(30)]}),
                   w / "sft.parquet")

    for bucket in ("bucket", "my-bucket", "corpus", "packed"):
        s3_server.create_bucket(Bucket=bucket)
    crawl = pa.BufferOutputStream()
    pq.write_table(pa.table({"url": [f"https://example.com/{i}" for i in range(40)], "content": texts[:40]}), crawl)
    s3_server.put_object(Bucket="bucket", Key="crawl/part-0.parquet", Body=crawl.getvalue().to_pybytes())
    body = (w / "corpus" / "a.jsonl").read_bytes()
    s3_server.put_object(Bucket="my-bucket", Key="corpus/a.jsonl", Body=body)
    s3_server.put_object(Bucket="corpus", Key="a.jsonl", Body=body)
    return w


def run(cwd: Path, script: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=os.environ.copy())
    return proc


def _not_here(command: str) -> str | None:
    return next((why for start, why in NOT_HERE.items() if command.startswith(start)), None)


def _outputs(command: str) -> list[str]:
    """The output roots a command writes (its lock keys: commands writing the same root take turns)."""
    roots = re.findall(r"--(?:output|to)\s+(\S+)", command)
    if not roots and "--config conf/local.yaml" in command:
        roots = ["out/local"]
    return sorted(r.rstrip("/") for r in roots)


def test_the_demo_prints_the_readme_summary(scratch):
    shown = README.split("It ends\nwith this summary:", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    printed = (scratch / "demo-summary.txt").read_text()
    assert printed_as_shown(shown, printed), printed


def test_every_shell_command_of_the_docs_runs(scratch):
    """Blocks run side by side (each one's commands in order, with its exports); commands that
    write the same output root take turns."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Lock

    endpoint = os.environ["AWS_ENDPOINT_URL"]
    locks: dict[str, Lock] = {}
    jobs, skipped = [], []
    seen: set[str] = set()  # a command several pages show runs once (its first page's block)
    for line, block in blocks("bash"):
        exports = [c for c in commands(block) if c.startswith("export ")]
        chain = []
        for command in commands(block):
            command = command.replace("http://127.0.0.1:9000", endpoint)  # the test server's port
            if command.startswith("export ") or command in seen:
                continue
            seen.add(command)
            if CRON.match(command):  # the cron line's command, at once: it must fail only on its absent input
                chain.append((command.split("&&", 1)[1].split(">>", 1)[0].strip(), 2, "/data/corpus"))
            elif _not_here(command):
                skipped.append(_not_here(command))
            else:
                chain.append(("\n".join(exports + [command]), 0, ""))
        if chain:
            jobs.append((line, chain))
        for script, _, _ in chain:
            for root in _outputs(script):
                locks.setdefault(root, Lock())

    def run_chain(job):
        line, chain = job
        for script, code, says in chain:
            held = [locks[root] for root in _outputs(script)]
            for lock in held:
                lock.acquire()
            try:
                proc = run(scratch, script)
            finally:
                for lock in held:
                    lock.release()
            assert proc.returncode == code and says in proc.stderr, (line, script,
                                                                     proc.stderr[-3000:])
        return len(chain)

    with ThreadPoolExecutor(4) as pool:  # the commands wait on JVM starts and the S3 server as much as on cores
        ran = sum(pool.map(run_chain, jobs))
    assert ran >= 22 and set(skipped) == set(NOT_HERE.values()), skipped
    for root in ("out/mycorpus", "out/tok", "out/local", "out/llama", "out/chat", "out/sft", "out/nobos"):
        assert (scratch / root / "stats" / "_delta_log").is_dir(), root
    assert (scratch / "report.html").stat().st_size > 50_000
    for export in ("demo-megatron", "demo-olmo", "demo-hf", "l2047-megatron"):
        assert (scratch / "out" / export / "manifest.json").is_file(), export


@pytest.mark.parametrize("where,code", blocks("python"), ids=lambda v: v if ".md:" in v else "")
def test_every_python_example_of_the_docs_runs(scratch, where, code):
    script = scratch / (re.sub(r"\W", "_", where) + ".py")
    script.write_text(code)
    if "dist.init_process_group" in code:  # a torchrun example: run it under torchrun, two processes
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script.name]
    else:
        argv = [sys.executable, script.name]
    proc = subprocess.run(argv, cwd=scratch, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (where, proc.stderr[-3000:])
    shown = _output_after(where)
    if shown is not None:
        assert printed_as_shown(shown, proc.stdout), (where, proc.stdout)


def _output_after(where: str) -> str | None:
    """The output a page shows after a Python block ("prints", then a text block), if any."""
    page, line = where.rsplit(":", 1)
    text = (ROOT / page).read_text()
    rest = text.split("\n", int(line) - 1)[-1].split("```", 2)[2]  # after the block's closing fence
    m = re.match(r"\s*prints\s*\n+```text\n(.*?)```", rest, re.S)
    return m.group(1) if m else None


def test_the_demo_rejects_are_as_the_readme_says(scratch):
    import pyarrow.dataset as ds
    from deltalake import DeltaTable

    rejects = ds.dataset(DeltaTable(str(scratch / "out/demo/rejects")).file_uris(), format="parquet").to_table()
    codes = rejects.column("reason_code").to_pylist()
    said = re.search(r"The (\d+) rejects are (\d+) empty files \(most of\s+them `__init__.py`\) and (\w+) test "
                     r"files that are not valid UTF-8", README)
    assert said, "the README's sentence on the demo's rejects changed: update this test"
    words = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
    assert int(said.group(1)) == len(codes) and set(codes) == {"empty", "invalid_utf8"}
    assert codes.count("empty") == int(said.group(2)) and codes.count("invalid_utf8") == words[said.group(3)]
    empty = [s for s, c in zip(rejects.column("source").to_pylist(), codes) if c == "empty"]
    assert sum(s.endswith("__init__.py") for s in empty) > len(empty) / 2
