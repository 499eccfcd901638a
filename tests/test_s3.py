"""Object storage, against a real S3 protocol server (moto) on loopback: every byte through
pyarrow.fs and deltalake, the lock with conditional writes, and the preflight."""

import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bfpack_spark.config import load_config
from bfpack_spark.errors import InputError
from bfpack_spark.io.store.lock import OutputLock, RunLockedError, S3Lock
from bfpack_spark.io.tables.read import snapshot_dataset
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


def rows(uri: str, drop: tuple[str, ...] = ()) -> list[str]:
    """A table's rows, read through pyarrow from the snapshot's files (Spark's JVM has no S3 here)."""
    table = snapshot_dataset(uri).to_table()
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in table.drop_columns(list(drop)).to_pylist())


def same_tables(a: str, b: str, copies: bool = False) -> None:
    """The same rows; ``copies``: the tables of the same files on two stores, whose run ids differ (a run's
    identity is its files as listed: their versions are their ETags on S3, modification times on disk)."""
    for name in TABLES:
        assert rows(f"{a}/{name}", ("run_id",) if copies else ()) == rows(f"{b}/{name}", ("run_id",) if copies
                                                                            else ()), name


def test_s3_to_s3_equals_the_local_run_and_append_adds_nothing(spark, corpus, bucket, tmp_path):
    local = pack(spark, [str(corpus)], str(tmp_path / "local"))
    remote = pack(spark, ["s3://corpus/text/"], f"{bucket}/packed", **{"output.mode": "append"})
    assert remote.run_id != local.run_id and remote.stats["audit_passed"]
    same_tables(str(tmp_path / "local"), f"{bucket}/packed", copies=True)
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
    pack(spark, [str(corpus)], str(tmp_path / "ref"))
    inject({"commit:sequences": "always"})
    with pytest.raises(Exception, match="injected failure"):
        pack(spark, ["s3://corpus/text/"], f"{bucket}/packed", **{"output.mode": "append"})
    # readers see whole tables only: documents committed, sequences not yet, stats not at all
    assert snapshot_dataset(f"{bucket}/packed/stats") is None
    inject({})
    pack(spark, ["s3://corpus/text/"], f"{bucket}/packed", **{"output.mode": "append"})
    same_tables(str(tmp_path / "ref"), f"{bucket}/packed", copies=True)


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
    assert [{**s, "run_id": None} for s in local["shards"]] == [{**s, "run_id": None} for s in remote["shards"]]
    assert len(local["shards"]) > 1
    name = bucket.removeprefix("s3://")
    prefix = f"export-{fmt}/"
    keys = sorted(o["Key"] for o in s3_server.list_objects_v2(Bucket=name, Prefix=prefix)["Contents"])
    assert [k.removeprefix(prefix) for k in keys] == sorted(p.name for p in (tmp_path / "export").iterdir())
    for key in keys:
        body = s3_server.get_object(Bucket=name, Key=key)["Body"].read()
        if key.endswith(".json"):  # where the table and the export are differs
            continue
        local_body = (tmp_path / "export" / key.removeprefix(prefix)).read_bytes()
        if key.endswith(".arrow"):  # hf's rows name their run (the copies' run ids differ)
            body, local_body = (pa.ipc.open_stream(b).read_all().drop_columns(["run_id"]) for b in (body, local_body))
        assert body == local_body, key
    again = export(f"{bucket}/packed", fmt, f"{bucket}/export-{fmt}", spark=spark)
    assert again["already_exported"]


@pytest.fixture
def faulty(s3_server):
    """The S3 server behind a proxy that throttles, drops connections and adds latency (tests/s3proxy.py)."""
    from s3proxy import Faults, FaultyProxy

    with FaultyProxy(os.environ["AWS_ENDPOINT_URL"], Faults(seed=24)) as proxy:
        yield proxy


def bfpack(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    """The CLI in a fresh process (its Spark tasks then talk to the endpoint it is given), and its time."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bfpack_spark.cli", *args], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, time.perf_counter() - start


def objects(client, bucket: str, prefix: str) -> dict[str, bytes]:
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    return {k.removeprefix(prefix): client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def test_throttled_and_dropped_requests_are_retried_and_the_tables_equal_the_fault_free_run(
        spark, corpus, bucket, faulty, s3_server):
    """20% of requests answered 503 SlowDown, 5% dropped after they took effect (reads cut off
    mid-response), 20 ms before every first byte: pack, append rerun and export equal the
    fault-free run's, byte for byte."""
    pack_args = ["pack", "-q", "--input", "s3://corpus/text/", "--seq-len", str(L), "--mode", "append",
                 "--master", "local[2]"]
    clean, clean_seconds = bfpack(*pack_args, "--output", f"{bucket}/clean")
    faulty.faults.set(slow_down=0.2, dropped=0.05, latency=0.02)
    through = ["--storage-option", f"AWS_ENDPOINT_URL={faulty.url}"]
    done, faulty_seconds = bfpack(*pack_args, "--output", f"{bucket}/faulty", *through)
    retried = snapshot_dataset(f"{bucket}/faulty/stats").to_table().column("requests_retried").to_pylist()
    assert retried[0] > 0 and faulty.faults.counts["slow_down"] > 0 and faulty.faults.counts["dropped"] > 0
    assert "requests retried (throttled or dropped)" in done.stdout and "s3fs.cc" not in done.stderr
    run_ids = {f"{bucket}/{r}": set(snapshot_dataset(f"{bucket}/{r}/stats").to_table().column("run_id").to_pylist())
               for r in ("clean", "faulty")}
    assert len(set(map(frozenset, run_ids.values()))) == 1, run_ids
    same_tables(f"{bucket}/clean", f"{bucket}/faulty")
    again, _ = bfpack(*pack_args, "--output", f"{bucket}/faulty", *through)
    assert "already committed" in again.stdout
    assert snapshot_dataset(f"{bucket}/faulty/sequences").count_rows() == \
        snapshot_dataset(f"{bucket}/clean/sequences").count_rows()
    faulty.faults.set()
    from bfpack_spark.export import export

    export(f"{bucket}/clean", "megatron", f"{bucket}/export-clean", spark=spark)
    faulty.faults.set(slow_down=0.2, dropped=0.05, latency=0.02)
    bfpack("export", f"{bucket}/faulty", "--format", "megatron", "--to", f"{bucket}/export-faulty",
           "--master", "local[2]", *through)
    counts = dict(faulty.faults.counts)
    faulty.faults.set()
    name = bucket.removeprefix("s3://")
    clean_export, faulty_export = objects(s3_server, name, "export-clean/"), objects(s3_server, name, "export-faulty/")
    assert sorted(clean_export) == sorted(faulty_export) and len(clean_export) > 2
    for key, body in clean_export.items():
        if not key.endswith(".json"):  # the manifest names where the table is
            assert faulty_export[key] == body, key
    print(f"\nfault-free pack {clean_seconds:.1f}s; with 20% SlowDown, 5% dropped, 20 ms: {faulty_seconds:.1f}s "
          f"({faulty_seconds / clean_seconds:.2f}x), {retried[0]} requests retried; proxy: {counts}")


def test_a_wrong_bucket_behind_a_throttling_store_still_fails_in_seconds(spark, corpus, faulty):
    faulty.faults.set(slow_down=0.2)
    start = time.perf_counter()
    with pytest.raises(InputError, match="s3://no-such-bucket.*(NoSuchBucket|not found)"):
        pack(spark, ["s3://corpus/text/"], "s3://no-such-bucket/packed",
             **{"output.storage_options": {"AWS_ENDPOINT_URL": faulty.url}})
    assert time.perf_counter() - start < 10


def test_wrong_credentials_behind_a_throttling_store_fail_in_seconds_with_the_stores_message(corpus, faulty):
    faulty.faults.set(slow_down=0.2, denied_key="AKIAWRONGKEY")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bfpack_spark.cli", "pack", "-q", "--input", "s3://corpus/text/",
                           "--output", "s3://packed-denied/out", "--storage-option", f"AWS_ENDPOINT_URL={faulty.url}",
                           "--storage-option", "AWS_ACCESS_KEY_ID=AKIAWRONGKEY",
                           "--storage-option", "AWS_SECRET_ACCESS_KEY=wrong"],
                          capture_output=True, text=True, timeout=120)
    # a HEAD request's 403 has no body: the client names it ACCESS_DENIED
    assert done.returncode == 2 and re.search(r"ACCESS_DENIED|InvalidAccessKeyId", done.stderr), done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1 and time.perf_counter() - start < 20


@pytest.mark.parametrize("message, retried", [
    ("AWS Error SLOW_DOWN during PutObject operation: Please reduce your request rate.", True),
    ("AWS Error SERVICE_UNAVAILABLE during GetObject operation: ", True),
    ("AWS Error INTERNAL_FAILURE during GetObject operation: Failed to flush response stream", True),
    ("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 52, Server returned nothing", True),
    ("An error occurred (RequestLimitExceeded) when calling the PutObject operation", True),
    ("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Couldn't connect to server", False),
    ("AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 6, Could not resolve hostname", False),
    ("Bucket 'x' not found; AWS Error NO_SUCH_BUCKET: NoSuchBucket", False),
    ("AWS Error ACCESS_DENIED during PutObject operation: Access Denied", False),
    ("An error occurred (InvalidAccessKeyId) when calling the PutObject operation (503)", False),
])
def test_retries_by_kind(message, retried):
    from bfpack_spark.io.store.retry import transient

    assert transient(OSError(message)) is retried


def test_a_missing_object_is_never_retried_whatever_its_path_says():
    """A bucket or key may be named like an error ("throttled-...", "timeout-5xx"): a missing object
    is not retried for it (each of a run's first tasks asks for a record that is not there)."""
    from bfpack_spark.io.store.retry import transient

    assert not transient(FileNotFoundError(2, "Path does not exist 'out-throttled/_bfpack_work/done/read-0.json'"))
    assert transient(OSError("Path 'out-throttled/x' read failed")) is True  # the text alone still counts


def test_the_listing_reads_what_boto3_reads(s3_server):
    """The listing's own requests and XML reading give, page after page, the keys, sizes, times and ETags
    boto3 gives, keys with spaces, '+', '&' and non-ASCII letters included, folder markers left out."""
    from concurrent.futures import ThreadPoolExecutor

    from bfpack_spark.io.store import s3

    s3_server.create_bucket(Bucket="listing-odd-keys")
    keys = [f"p/{i // 1000:04d}/f {i:05d}+&é<x>.jsonl" for i in range(2300)] + ["p/dir/", "q/other.jsonl"]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3_server.put_object(Bucket="listing-odd-keys", Key=k, Body=b"x" * (len(k) % 7)),
                      keys))
    objects, _ = s3.list_objects("listing-odd-keys", "p/")
    expected = [(o["Key"], o["Size"], o["ETag"].strip('"'), int(o["LastModified"].timestamp()))
                for page in s3_server.get_paginator("list_objects_v2").paginate(Bucket="listing-odd-keys", Prefix="p/")
                for o in page["Contents"] if not o["Key"].endswith("/")]
    assert [(o.key, o.size, o.etag, o.modified_ns // 10**9) for o in objects] == expected and len(expected) == 2300
    top, prefixes = s3.list_objects("listing-odd-keys", "p/", "/")
    assert top == [] and prefixes == ["p/0000/", "p/0001/", "p/0002/", "p/dir/"]
    first, _ = s3.list_objects("listing-odd-keys", "p/0001/", max_keys=1)
    assert [o.key for o in first] == ["p/0001/f 01000+&é<x>.jsonl"]


def test_an_unreachable_store_is_one_line_naming_the_input(tmp_path):
    """The listing's own requests keep the listing's error: a store that cannot be reached is an input
    error (exit 2, one line), at once."""
    import socket

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bfpack_spark.cli", "pack", "-q", "--input", "s3://corpus/text/",
                           "--output", str(tmp_path / "out"), "--storage-option",
                           f"AWS_ENDPOINT_URL=http://127.0.0.1:{port}"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                               "AWS_REGION": "us-east-1"})  # signed: the request itself meets the closed port
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1 and "cannot list input 's3://corpus/text/'" in done.stderr
    assert time.perf_counter() - start < 30
