"""Object storage, against a real S3 protocol server (moto) on loopback: every byte through
pyarrow.fs and deltalake, the lock with conditional writes, and the preflight."""

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bfpack_spark.config import load_config
from bfpack_spark.io.delta import snapshot_dataset
from bfpack_spark.io.files import InputError
from bfpack_spark.io.lock import OutputLock, RunLockedError, S3Lock
from bfpack_spark.job import run

from corpora import write_jsonl

L = 256
TABLES = ("sequences", "documents", "rejects")


def put_dir(client, bucket: str, local, prefix: str) -> None:
    for path in sorted(local.iterdir()):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.name}", Body=path.read_bytes())


@pytest.fixture(scope="module")
def corpus(s3_server, tmp_path_factory):
    """The same JSON-lines and Parquet corpus on local disk and in s3://corpus/."""
    root = tmp_path_factory.mktemp("s3-corpus")
    rng = np.random.default_rng(3)
    words = ["packing", "best", "fit", "sequence", "token", "document", "spark", "delta", "the", "of"]
    for f in range(2):
        write_jsonl(root / f"part-{f}.jsonl", [
            {"id": f"j{f}-{i}", "text": " ".join(rng.choice(words, int(rng.integers(5, 900))))} for i in range(120)])
    texts = [" ".join(rng.choice(words, int(rng.integers(5, 600)))) for _ in range(80)]
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(80)], "text": texts}), root / "part-2.parquet",
                   row_group_size=20)
    s3_server.create_bucket(Bucket="corpus")
    put_dir(s3_server, "corpus", root, "text")
    return root


@pytest.fixture
def bucket(s3_server, request):
    name = "out-" + request.node.name.replace("_", "-")[:40].lower().strip("-")
    s3_server.create_bucket(Bucket=name)
    return f"s3://{name}"


def pack(spark, inputs, output, **overrides):
    settings = {"input.paths": inputs, "output.output": output, "packing.seq_len": L}
    settings.update(overrides)
    return run(load_config(None, settings), spark)


def rows(uri: str) -> list[str]:
    """A table's rows, read through pyarrow from the snapshot's files (Spark's JVM has no S3 here)."""
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in snapshot_dataset(uri).to_table().to_pylist())


def same_tables(a: str, b: str) -> None:
    for name in TABLES:
        assert rows(f"{a}/{name}") == rows(f"{b}/{name}"), name


def test_s3_to_s3_equals_the_local_run_and_append_adds_nothing(spark, corpus, bucket, tmp_path):
    local = pack(spark, [str(corpus)], str(tmp_path / "local"))
    remote = pack(spark, ["s3://corpus/text/"], f"{bucket}/packed", **{"output.mode": "append"})
    assert remote.run_id == local.run_id and remote.stats["audit_passed"]
    same_tables(str(tmp_path / "local"), f"{bucket}/packed")
    again = pack(spark, ["s3://corpus/text/"], f"{bucket}/packed", **{"output.mode": "append"})
    assert again.already_committed
    assert snapshot_dataset(f"{bucket}/packed/sequences").count_rows() == local.stats["sequences"]
    # another run of one file already packed: its ids are the earlier run's, read from S3 in tasks
    one = pack(spark, ["s3://corpus/text/part-0.jsonl"], f"{bucket}/packed",
               **{"output.mode": "append", "quality.max_reject_fraction": 1.0})
    assert one.stats["documents_rejected"] == 120 and one.stats["documents_packed"] == 0
    reasons = {r["reason"] for r in snapshot_dataset(f"{bucket}/packed/rejects").to_table().to_pylist()}
    assert reasons == {f"duplicate id; first seen in part-0.jsonl (run {remote.run_id}) at byte {r}" for r in
                       [len("".join(open(corpus / "part-0.jsonl").readlines()[:i])) for i in range(120)]}


def test_pack_tokenized_from_s3_and_read_back_with_the_loader(spark, s3_server, bucket, tmp_path):
    from corpora import write_tokenized

    docs = write_tokenized(tmp_path / "tok", n_files=2, docs_per_file=150, median=100, seed=5)
    put_dir(s3_server, bucket.removeprefix("s3://"), tmp_path / "tok", "tok")
    result = pack(spark, [f"{bucket}/tok/"], f"{bucket}/out", **{"input.token_column": "tokens"})
    assert result.stats["documents_packed"] == len(docs)
    torch = pytest.importorskip("torch")  # noqa: F841
    from bfpack_spark.loader import PackedSequences

    seen = {}
    for e in PackedSequences(f"{bucket}/out", seed=1):
        seen[e["seq_id"]] = e
    assert len(seen) == result.stats["sequences"]
    tokens = sum(int(e["seq_lens"].sum()) for e in seen.values())
    assert tokens == sum(map(len, docs.values()))


def test_killed_during_the_write_then_rerun_equals_an_uninterrupted_run(spark, corpus, bucket, tmp_path, inject):
    reference = pack(spark, [str(corpus)], str(tmp_path / "ref"))
    inject({"commit:sequences": "always"})
    with pytest.raises(Exception, match="injected failure"):
        pack(spark, ["s3://corpus/text/"], f"{bucket}/packed", **{"output.mode": "append"})
    # readers see whole tables only: documents committed, sequences not yet, stats not at all
    assert snapshot_dataset(f"{bucket}/packed/stats") is None
    inject({})
    rerun = pack(spark, ["s3://corpus/text/"], f"{bucket}/packed", **{"output.mode": "append"})
    assert rerun.run_id == reference.run_id
    same_tables(str(tmp_path / "ref"), f"{bucket}/packed")


def test_one_writer_per_s3_root(spark, corpus, bucket):
    root = f"{bucket}/packed"
    results = []

    def take(i):
        try:
            with OutputLock(root, f"run-{i}"):
                results.append(("held", i))
                time.sleep(1.0)
        except RunLockedError as exc:
            results.append(("refused", str(exc)))

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r[0] for r in results) == ["held", "refused"]
    assert "is writing to" in next(r[1] for r in results if r[0] == "refused")
    with OutputLock(root, "run-holder"):
        with pytest.raises(RunLockedError, match="run-holder.*last heartbeat"):
            pack(spark, ["s3://corpus/text/"], root)
    with OutputLock(root, "run-after"):  # released: the next run takes it
        pass


def test_a_dead_runs_lock_expires_and_is_taken_over(s3_server, bucket, monkeypatch):
    root = f"{bucket}/packed"
    stale = {"run_id": "run-dead", "pid": 1, "host": "elsewhere", "started": "then", "heartbeat": time.time() - 999}
    s3_server.put_object(Bucket=bucket.removeprefix("s3://"), Key="packed/_bfpack.lock", Body=json.dumps(stale))
    monkeypatch.setattr(S3Lock, "HEARTBEAT", 0.2)
    with OutputLock(root, "run-new") as lock:
        time.sleep(0.7)  # heartbeats rewrite the object
        body = json.loads(s3_server.get_object(Bucket=bucket.removeprefix("s3://"), Key="packed/_bfpack.lock")
                          ["Body"].read())
        assert body["run_id"] == "run-new" and time.time() - body["heartbeat"] < 0.6 and lock.held
    assert "Contents" not in s3_server.list_objects_v2(Bucket=bucket.removeprefix("s3://"), Prefix="packed/")


def test_a_wrong_bucket_fails_in_seconds_before_reading(spark, corpus):
    start = time.perf_counter()
    with pytest.raises(InputError, match="s3://no-such-bucket.*(NoSuchBucket|not found)"):
        pack(spark, ["s3://corpus/text/"], "s3://no-such-bucket/packed")
    assert time.perf_counter() - start < 10


def test_the_cli_fails_on_a_wrong_endpoint_in_seconds_and_takes_storage_options(corpus, tmp_path, s3_server):
    import os

    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bfpack_spark.cli", "pack", "--input", str(corpus),
                           "--output", "s3://corpus/out", "--storage-option", "AWS_ENDPOINT_URL=http://127.0.0.1:9"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "cannot write to the output root 's3://corpus/out'" in proc.stderr
    assert time.perf_counter() - start < 20 and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("fmt", ["megatron", "hf"])
def test_an_export_from_s3_to_s3_equals_the_local_export_byte_for_byte(spark, corpus, bucket, tmp_path, s3_server,
                                                                        fmt):
    from bfpack_spark.export import export

    pack(spark, [str(corpus)], str(tmp_path / "local"))
    pack(spark, ["s3://corpus/text/"], f"{bucket}/packed", **{"output.mode": "append"})
    local = export(str(tmp_path / "local"), fmt, str(tmp_path / "export"), spark=spark)
    remote = export(f"{bucket}/packed", fmt, f"{bucket}/export-{fmt}", spark=spark)
    assert local["shards"] == remote["shards"] and len(local["shards"]) > 1
    name = bucket.removeprefix("s3://")
    prefix = f"export-{fmt}/"
    keys = sorted(o["Key"] for o in s3_server.list_objects_v2(Bucket=name, Prefix=prefix)["Contents"])
    assert [k.removeprefix(prefix) for k in keys] == sorted(p.name for p in (tmp_path / "export").iterdir())
    for key in keys:
        body = s3_server.get_object(Bucket=name, Key=key)["Body"].read()
        if key.endswith(".json"):  # where the table and the export are differs
            continue
        assert body == (tmp_path / "export" / key.removeprefix(prefix)).read_bytes(), key
    again = export(f"{bucket}/packed", fmt, f"{bucket}/export-{fmt}", spark=spark)
    assert again["already_exported"]
