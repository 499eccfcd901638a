"""Many input files: planned from the listing alone, read by the tasks; the same tables whatever the
listing's order or the number of files; a damaged file among thousands a reject; an incremental
run reads no file an earlier run packed (requests counted on the S3 server's side, by a proxy)."""

import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest

from bfpack_spark.config import load_config
from bfpack_spark.io.listing.listing import list_inputs
from bfpack_spark.io.listing.plan import plan_groups
from bfpack_spark.io.tables.read import snapshot_dataset
from bfpack_spark.job import run

L = 256
WORDS = ["packing", "best", "fit", "sequence", "token", "document", "spark", "delta", "the", "of", "many", "files"]


def corpus_docs(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"id": f"d{i}", "text": " ".join(rng.choice(WORDS, int(rng.lognormal(np.log(60), 1.2)) + 1))}
            for i in range(n)]


def write_files(root, docs: list[dict], n_files: int, order=None, gz: bool = True) -> None:
    """The documents, in order, as ``n_files`` JSON-lines files (``order``: the order they are written in)."""
    bounds = np.linspace(0, len(docs), n_files + 1).astype(int)
    for f in order if order is not None else range(n_files):
        path = root / f"{f // 100:03d}" / f"part-{f:05d}.jsonl{'.gz' if gz else ''}"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(d) + "\n" for d in docs[bounds[f]:bounds[f + 1]]).encode()
        path.write_bytes(gzip.compress(data, mtime=0) if gz else data)


def pack(spark, inputs, output, **overrides):
    settings = {"input.paths": [str(p) for p in inputs], "output.output": str(output), "packing.seq_len": L,
                **overrides}
    return run(load_config(None, settings), spark)


def rows(root, name: str, drop=("run_id",)) -> list[str]:
    table = snapshot_dataset(f"{root}/{name}").to_table()
    table = table.drop_columns([c for c in drop if c in table.column_names])
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in table.to_pylist())


def test_groups_and_tables_do_not_depend_on_the_listing_order_or_the_number_of_files(spark, tmp_path):
    docs = corpus_docs(600)
    first, again, many = tmp_path / "first", tmp_path / "again", tmp_path / "many"
    write_files(first, docs, 8)
    order = list(range(8))
    random.Random(1).shuffle(order)
    write_files(again, docs, 8, order)  # written in another order: listed in another order
    write_files(many, docs, 300, list(reversed(range(300))))

    def groups(root):
        plan = plan_groups(list_inputs([str(root)]), "text", tokenized=False, seq_len=L, target_items=200,
                           min_groups=4)
        return [[(s.source, s.byte_range) for s in g] for g in plan.groups]

    assert groups(first) == groups(again) and len(groups(first)) >= 4
    a = pack(spark, [first], tmp_path / "out-first")
    pack(spark, [again], tmp_path / "out-again")
    c = pack(spark, [many], tmp_path / "out-many")
    assert a.stats["plan_first_round"] == c.stats["plan_first_round"] == "driver"
    for name in ("sequences", "documents", "rejects"):  # the run id says when the files were written
        assert rows(tmp_path / "out-first", name) == rows(tmp_path / "out-again", name), name
    # 300 files: the same sequences (the driver's plan is one-process BFD over the same documents in the
    # same order); the documents' rows differ only in where they were read
    assert rows(tmp_path / "out-first", "sequences") == rows(tmp_path / "out-many", "sequences")
    assert rows(tmp_path / "out-first", "documents", ("run_id", "source", "row")) == \
        rows(tmp_path / "out-many", "documents", ("run_id", "source", "row"))
    assert c.stats["input_files"] == 300 and a.stats["sequences"] == c.stats["sequences"]


def test_a_damaged_file_among_ten_thousand_is_a_reject(spark, tmp_path):
    docs = corpus_docs(10_000, seed=2)
    corpus = tmp_path / "corpus"
    write_files(corpus, docs, 10_000)
    damaged = corpus / "043" / "part-04321.jsonl.gz"
    damaged.write_bytes(damaged.read_bytes()[:-12])  # cut inside its compressed stream
    started = time.perf_counter()
    result = pack(spark, [corpus], tmp_path / "out", **{"input.target_items_per_partition": 4000})
    assert result.stats["input_files"] == 10_000 and result.stats["audit_passed"]
    rejects = snapshot_dataset(f"{tmp_path}/out/rejects").to_table().to_pylist()
    assert [(r["source"], r["reason_code"]) for r in rejects] == [("043/part-04321.jsonl.gz", "corrupt_file")]
    assert (result.stats["documents_read"], result.stats["documents_packed"]) == (10_000, 9_999)
    print(f"\n10,000 files packed in {time.perf_counter() - started:.1f}s")


def test_planning_opens_no_input_file_but_the_first(tmp_path, monkeypatch):
    """The driver lists; only the first file is looked into (its columns), and no other file is opened
    (every read of an input file goes through the store's two openers, watched here where they are used)."""
    from bfpack_spark.io.formats import fetch
    from bfpack_spark.io.listing import listing, plan
    from bfpack_spark.stages.inputs import plan_inputs

    docs = corpus_docs(500)
    write_files(tmp_path / "c", docs, 50)
    opened: list[str] = []

    def watched(module, name):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda uri, *a, **k: opened.append(uri) or real(uri, *a, **k))

    for module, name in ((fetch, "read_bytes"), (fetch, "open_input"), (plan, "open_input"),
                         (listing, "read_bytes")):
        watched(module, name)

    plan = plan_inputs(load_config(None, {"input.paths": [str(tmp_path / "c")], "output.output": str(tmp_path / "o"),
                                          "input.target_items_per_partition": 100}))
    assert len(plan.listing) == 50 and plan.n_groups >= 4
    assert [os.path.relpath(u, tmp_path / "c") for u in opened] == ["000/part-00000.jsonl.gz"]


def bfpack(*args: str, env=None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "bfpack_spark.cli", "pack", "-q", "--seq-len", str(L),
                           "--master", "local[2]", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_s3_inputs_one_request_each_and_incremental_runs_read_no_packed_file(s3_server, tmp_path):
    """Through a proxy that counts requests per object: a pack reads each small input file with one GET
    (no HEAD); an incremental run after 1% more files reads only the new ones, and a changed file (new
    ETag) is re-packed with its run under --repack-changed."""
    from s3proxy import Faults, FaultyProxy

    docs = corpus_docs(3000, seed=3)
    local = tmp_path / "corpus"
    write_files(local, docs, 200)
    s3_server.create_bucket(Bucket="many")
    for path in sorted(local.rglob("*.gz")):
        s3_server.put_object(Bucket="many", Key=f"c/{path.relative_to(local)}", Body=path.read_bytes())
    out = tmp_path / "out"
    with FaultyProxy(os.environ["AWS_ENDPOINT_URL"], Faults(latency=0.005)) as proxy:
        through = ["--storage-option", f"AWS_ENDPOINT_URL={proxy.url}"]
        bfpack("--input", "s3://many/c/", "--output", str(out), "--mode", "incremental", *through)
        per_file = {p: n for p, n in proxy.faults.by_path.items() if p.endswith(".gz")}
        first = per_file.pop("/many/c/000/part-00000.jsonl.gz")  # its columns were checked by the driver
        assert len(per_file) == 199 and set(per_file.values()) == {1} and first == 2, per_file
        others = proxy.faults.counts["requests"] - 201  # listings, the lock, the output root's probe
        assert others <= 12, proxy.faults.by_path

        new = [{"id": f"new{i}", "text": f"a new document {i}"} for i in range(15)]
        s3_server.put_object(Bucket="many", Key="c/new/part-a.jsonl.gz",
                             Body=gzip.compress("".join(json.dumps(d) + "\n" for d in new[:10]).encode(), mtime=0))
        s3_server.put_object(Bucket="many", Key="c/new/part-b.jsonl.gz",
                             Body=gzip.compress("".join(json.dumps(d) + "\n" for d in new[10:]).encode(), mtime=0))
        proxy.faults.by_path.clear()
        bfpack("--input", "s3://many/c/", "--output", str(out), "--mode", "incremental", *through)
        touched = sorted(p for p in proxy.faults.by_path if p.endswith(".gz"))
        assert touched == ["/many/c/new/part-a.jsonl.gz", "/many/c/new/part-b.jsonl.gz"]
        stats = snapshot_dataset(f"{out}/stats").to_table().to_pylist()
        assert sorted(r["documents_read"] for r in stats) == [15, 3000]

        # the same bytes uploaded again: the same ETag, nothing new; other bytes: the run re-packed
        s3_server.put_object(Bucket="many", Key="c/new/part-b.jsonl.gz",
                             Body=gzip.compress("".join(json.dumps(d) + "\n" for d in new[10:]).encode(), mtime=0))
        done = bfpack("--input", "s3://many/c/", "--output", str(out), "--mode", "incremental", *through)
        assert "no new input file" in done.stdout
        s3_server.put_object(Bucket="many", Key="c/new/part-b.jsonl.gz",
                             Body=gzip.compress(b'{"id": "changed", "text": "changed"}\n'))
        proxy.faults.by_path.clear()
        bfpack("--input", "s3://many/c/", "--output", str(out), "--mode", "incremental", "--repack-changed",
               *through)
        touched = sorted(p for p in proxy.faults.by_path if p.endswith(".gz"))
        assert touched == ["/many/c/new/part-a.jsonl.gz", "/many/c/new/part-b.jsonl.gz"]
    ids = snapshot_dataset(f"{out}/documents").to_table().column("doc_id").to_pylist()
    assert sorted(ids) == sorted([d["id"] for d in docs] + [f"new{i}" for i in range(10)] + ["changed"])


def test_incremental_runs_pick_new_and_changed_files_by_their_listing(spark, tmp_path):
    """Locally a file's version is its modification time: a file rewritten is changed, even with the same
    size; one only touched is too (its content is not read to tell)."""
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    write_files(corpus, corpus_docs(100), 4, gz=False)
    settings = {"output.mode": "incremental"}
    pack(spark, [corpus], out, **settings)
    target = corpus / "000" / "part-00002.jsonl"
    data = target.read_bytes()
    target.write_bytes(data.replace(b'"d5', b'"x5', 1) if b'"d5' in data else data[::-1])
    assert len(target.read_bytes()) == len(data)
    from bfpack_spark.errors import InputError

    with pytest.raises(InputError, match=r"part-00002\.jsonl changed after run"):
        pack(spark, [corpus], out, **settings)
    again = pack(spark, [corpus], out, **settings, **{"output.repack_changed": True})
    assert again.stats["input_files"] == 4  # the first run's files, all of them
    assert pack(spark, [corpus], out, **settings).nothing_new
    inputs = snapshot_dataset(f"{out}/inputs").to_table()
    assert set(inputs.column("run_id").to_pylist()) == {again.run_id}
    modified = inputs.column("modified").to_pylist()
    assert all(m is not None for m in modified)
    listed = {r["uri"]: r for r in inputs.to_pylist()}
    assert listed[str(target)]["modified"].timestamp() == pytest.approx(os.stat(target).st_mtime, abs=1e-3)
    assert pa.types.is_timestamp(inputs.schema.field("modified").type)
    shutil.rmtree(out)
