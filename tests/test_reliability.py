"""Nothing lost, nothing doubled: bad records, failures at every stage, reruns, concurrency."""

import gzip
import json
import os
import time

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from chispa import assert_df_equality
from deltalake import DeltaTable

from bfpack_spark.config import load_config
from bfpack_spark.errors import InputError
from bfpack_spark.faults import InjectedFault
from bfpack_spark.io.store.lock import LOCK_NAME, OutputLock, RunLockedError
from bfpack_spark.io.tables.read import read_table, snapshot_dataset
from bfpack_spark.job import AuditError, run
from bfpack_spark.spark.session import first_line

from corpora import write_jsonl, write_tokenized

L = 256
GOOD = [{"id": f"good-{i}", "text": f"document {i} " + "word " * (i * 37 % 400)} for i in range(60)]
BAD_LINES = {  # raw line -> the words its reject reason must contain
    '{"id": "m1", "text": "unterminated"': "malformed JSON",
    '{"id": "n1", "text": null}': "is null",
    '{"id": "n2", "text": 123}': "not a string",
    '{"id": "n3"}': "is missing",
    '{"id": "e1", "text": ""}': "empty document",
    '{"text": "a record without its id"}': "id field 'id' is missing",
    '{"id": "good-3", "text": "same id again"}': "duplicate id",
    "[1, 2, 3]": "not a JSON object",
    "": "blank line",
    '{"id": "s1", "text": "\\ud800 lone surrogate"}': "unpaired surrogate",
}


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    lines = [json.dumps(r) for r in GOOD[:40]] + list(BAD_LINES)
    write_jsonl(root / "a.jsonl", lines)
    with open(root / "a.jsonl", "ab") as fh:
        fh.write(b'{"id": "u1", "text": "caf\xe9"}\n')  # invalid UTF-8
        fh.write(json.dumps({"id": "big", "text": "x" * 300_000}).encode() + b"\n")  # over the limit
        fh.write(json.dumps({"id": "large-ok", "text": "word " * 30_000}).encode() + b"\n")
    whole = gzip.compress("".join(json.dumps(r) + "\n" for r in GOOD[40:]).encode())
    (root / "b.jsonl.gz").write_bytes(whole[: len(whole) * 2 // 3])  # truncated
    (root / "c.jsonl.zst").write_bytes(os.urandom(2000))  # not zstd at all
    parquet = pa.table({"id": [f"pq-{i}" for i in range(30)], "text": [f"row {i} " + "text " * i for i in range(30)]})
    pq.write_table(parquet, root / "d.parquet", row_group_size=10)
    data = (root / "d.parquet").read_bytes()
    (root / "e.parquet").write_bytes(data[: len(data) // 2])  # truncated: no footer
    text = pq.ParquetFile(root / "d.parquet").metadata.row_group(1).column(1)  # damage rows 10-19
    at = text.dictionary_page_offset or text.data_page_offset
    (root / "d.parquet").write_bytes(data[:at] + b"\xff" * text.total_compressed_size
                                     + data[at + text.total_compressed_size:])
    return root


def pack(spark, paths, out, **overrides):
    settings = {"input.paths": [str(p) for p in paths], "output.output": str(out), "packing.seq_len": L,
                "quality.max_document_bytes": 200_000, "quality.max_reject_fraction": 1.0}
    settings.update(overrides)
    return run(load_config(None, settings), spark)


def test_every_bad_record_is_a_reject_with_its_reason(spark, bad_corpus, tmp_path):
    result = pack(spark, [bad_corpus], tmp_path)
    rejects = DeltaTable(str(tmp_path / "rejects")).to_pyarrow_table().to_pylist()
    documents = DeltaTable(str(tmp_path / "documents")).to_pyarrow_table()
    s = result.stats
    assert s["documents_read"] == s["documents_packed"] + s["documents_rejected"]
    assert s["documents_rejected"] == len(rejects) and s["documents_packed"] == documents.num_rows
    reasons = " | ".join(r["reason"] for r in rejects)
    for words in list(BAD_LINES.values()) + ["invalid UTF-8", "max_document_bytes", "corrupt or truncated",
                                             "unreadable Parquet file", "unreadable Parquet data in row group 1"]:
        assert words in reasons, words
    assert sum("corrupt or truncated" in r["reason"] for r in rejects) >= 2  # the .gz and the .zst
    packed = set(documents.column("doc_id").to_pylist())
    assert {f"good-{i}" for i in range(40)} | {"large-ok"} <= packed
    assert all(r["reason_code"] not in (None, "other") for r in rejects), {r["reason"] for r in rejects}
    assert {"invalid_json", "invalid_utf8", "too_large", "corrupt_file", "corrupt_row_group",
            "unreadable_file"} <= {r["reason_code"] for r in rejects}
    by_id = {r["doc_id"]: r["reason"] for r in rejects}  # ids stay readable in records rejected for their bytes
    assert "invalid UTF-8" in by_id["u1"] and "max_document_bytes" in by_id["big"]
    assert "malformed JSON" in by_id["m1"]  # an unterminated record whose id is still readable
    # the damaged Parquet row group's rows are rejects, one each; the others are packed
    assert sorted(r["row"] for r in rejects if r["source"] == "d.parquet") == list(range(10, 20))
    assert {f"pq-{i}" for i in [*range(10), *range(20, 30)]} <= packed
    # what the truncated gzip still held was read, line by line
    assert len(packed & {f"good-{i}" for i in range(40, 60)}) > 0
    lines_in_a = 40 + len(BAD_LINES) + 3
    from_a = (sum(r["source"] == "a.jsonl" for r in rejects)
              + documents.column("source").to_pylist().count("a.jsonl"))
    assert from_a == lines_in_a  # every line of a.jsonl is packed or rejected, exactly once
    for r in rejects:
        assert r["source"] and r["row"] is not None and r["run_id"] == result.run_id


def test_bad_token_ids_are_rejected(spark, tmp_path):
    table = pa.table({
        "id": ["ok", "oov", "neg", None, "nulltok", "empty", "ok2", "gap"],
        "tokens": pa.array([[1, 2, 3], [5, 200_000], [-1, 4], [7], [1, None], [], [9] * 600, [3, 100256]],
                           type=pa.list_(pa.int64())),
    })
    pq.write_table(table, tmp_path / "t.parquet")
    write_jsonl(tmp_path / "t.jsonl", [{"id": "j1", "tokens": "not a list"}, {"id": "j2", "tokens": [1.5]},
                                       {"id": "j3", "tokens": [4, 5]}])
    result = pack(spark, [tmp_path / "t.parquet", tmp_path / "t.jsonl"], tmp_path / "out",
                  **{"input.token_column": "tokens"})
    rejects = {r["doc_id"] or f"row {r['row']}": r["reason"]
               for r in DeltaTable(str(tmp_path / "out" / "rejects")).to_pyarrow_table().to_pylist()}
    assert "outside the vocabulary" in rejects["oov"] and "outside the vocabulary" in rejects["neg"]
    assert "token id 100256 is outside the vocabulary" in rejects["gap"]  # cl100k_base has no id 100256
    assert "null token id" in rejects["nulltok"] and "empty document" in rejects["empty"]
    assert "null or empty" in rejects["row 3"]
    assert "not a list of integers" in rejects["j1"] and "not a list of integers" in rejects["j2"]
    packed = DeltaTable(str(tmp_path / "out" / "documents")).to_pyarrow_table().column("doc_id").to_pylist()
    assert sorted(packed) == ["j3", "ok", "ok2"]
    assert result.stats["documents_read"] == 11


def test_too_many_rejects_fail_before_commit(spark, bad_corpus, tmp_path):
    with pytest.raises(AuditError, match="max_reject_fraction"):
        pack(spark, [bad_corpus], tmp_path, **{"quality.max_reject_fraction": 0.01})
    assert not DeltaTable.is_deltatable(str(tmp_path / "sequences"))


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    write_tokenized(root, n_files=3, docs_per_file=400, median=150, seed=7, row_group=100)
    return root


@pytest.fixture(scope="module")
def reference(spark, tokenized, tmp_path_factory):
    """An uninterrupted append-mode run, to compare the interrupted ones with."""
    out = tmp_path_factory.mktemp("reference")
    pack(spark, [tokenized], out, **{"input.token_column": "tokens", "output.mode": "append"})
    return out


def same_tables(spark, a, b):
    for name in ("sequences", "documents", "rejects"):
        assert_df_equality(read_table(spark, str(a / name)), read_table(spark, str(b / name)),
                           ignore_row_order=True)
    from pyspark.sql import functions as F

    def comparable(root):  # without timings, where the output went and what a rerun resumed; maps as JSON
        df = read_table(spark, str(root / "stats")).drop("started_at", "stage_seconds", "config",
                                                         "resumed_read_groups", "resumed_assembly_groups")
        return df.select(*[F.to_json(c).alias(c) if c.startswith("audit_") and c != "audit_passed" else c
                           for c in df.columns])

    assert_df_equality(comparable(a), comparable(b), ignore_row_order=True)


@pytest.mark.parametrize("point", ["read", "plan", "assemble", "staged", "commit:documents",
                                   "commit:sequences", "commit:stats"])
def test_killed_at_any_stage_then_rerun_equals_an_uninterrupted_run(spark, tokenized, reference, tmp_path,
                                                                    inject, point):
    settings = {"input.token_column": "tokens", "output.mode": "append"}
    inject({point: "always"})
    with pytest.raises(Exception) as failure:
        pack(spark, [tokenized], tmp_path, **settings)
    assert "injected failure" in str(failure.value) or isinstance(failure.value, InjectedFault)
    stage = {"read": "read", "plan": "plan", "assemble": "assemble and write"}.get(point, "commit")
    if point != "staged":  # the stage the error message names
        assert failure.value.bfpack_stage == stage
    if point in ("read", "assemble"):  # raised in a task: the one line is the task's exception
        assert first_line(failure.value) == f"bfpack_spark.faults.InjectedFault: injected failure at {point}"
    inject({})
    rerun = pack(spark, [tokenized], tmp_path, **settings)
    same_tables(spark, reference, tmp_path)
    if point != "read":  # every read task finished before the failure: the rerun replays them all
        assert rerun.stats["resumed_read_groups"] == rerun.stats["input_groups"]
    for name in ("sequences", "documents", "rejects", "stats"):  # no file of a failed attempt is left
        read = {uri.split(f"/{name}/")[1].split("/")[0] for uri in DeltaTable(str(tmp_path / name)).file_uris()}
        attempts = {p.name for p in (tmp_path / name).iterdir() if p.name.startswith("run-")}
        assert attempts == read and len(read) <= 1, (attempts, read)
        files = {str(p.relative_to(tmp_path / name)) for p in (tmp_path / name).glob("run-*/**/*.parquet")}
        assert files == {uri.split(f"/{name}/")[1] for uri in DeltaTable(str(tmp_path / name)).file_uris()}
    assert not (tmp_path / "_bfpack_work").exists(), "a workspace was left behind"


def test_running_twice_adds_rows_once(spark, tokenized, reference, tmp_path):
    settings = {"input.token_column": "tokens", "output.mode": "append"}
    first = pack(spark, [tokenized], tmp_path, **settings)
    second = pack(spark, [tokenized], tmp_path, **settings)
    assert second.already_committed and second.run_id == first.run_id
    same_tables(spark, reference, tmp_path)
    overwrite = {"input.token_column": "tokens", "output.mode": "overwrite"}
    pack(spark, [tokenized], tmp_path / "ow", **overwrite)
    pack(spark, [tokenized], tmp_path / "ow", **overwrite)
    assert DeltaTable(str(tmp_path / "ow" / "stats")).to_pyarrow_table().num_rows == 1
    assert (DeltaTable(str(tmp_path / "ow" / "sequences")).to_pyarrow_table().num_rows
            == DeltaTable(str(reference / "sequences")).to_pyarrow_table().num_rows)


def test_a_new_shard_appends_and_ids_stay_unique_per_run(spark, tokenized, reference, tmp_path):
    shard = tmp_path / "shard"
    write_tokenized(shard, n_files=1, docs_per_file=200, median=150, seed=99)
    settings = {"input.token_column": "tokens", "output.mode": "append"}
    a = pack(spark, [tokenized], tmp_path / "out", **settings)
    b = pack(spark, [shard], tmp_path / "out", **settings)
    assert a.run_id != b.run_id
    stats = DeltaTable(str(tmp_path / "out" / "stats")).to_pyarrow_table().to_pylist()
    assert sorted(s["run_id"] for s in stats) == sorted([a.run_id, b.run_id])
    seqs = DeltaTable(str(tmp_path / "out" / "sequences")).to_pandas()
    assert len(seqs) == a.stats["sequences"] + b.stats["sequences"]
    assert not seqs.duplicated(["run_id", "seq_id"]).any()


def test_file_order_and_shuffle_settings_do_not_change_the_tables(spark, tokenized, reference, tmp_path):
    files = sorted(tokenized.glob("*.parquet"), reverse=True)
    spark.conf.set("spark.sql.shuffle.partitions", "13")
    spark.conf.set("spark.sql.adaptive.enabled", "false")
    try:
        pack(spark, files, tmp_path, **{"input.token_column": "tokens", "output.mode": "append"})
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", "4")
        spark.conf.set("spark.sql.adaptive.enabled", "true")
    for name in ("sequences", "documents"):
        assert_df_equality(read_table(spark, str(reference / name)).drop("run_id"),
                           read_table(spark, str(tmp_path / name)).drop("run_id"), ignore_row_order=True)


def test_a_second_run_on_the_same_output_is_refused(spark, tokenized, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"run_id": "run-other", "pid": os.getpid(),
                                                  "host": os.uname().nodename, "started": "now"}))
    with pytest.raises(RunLockedError, match="another bfpack run \\(run-other"):
        pack(spark, [tokenized], tmp_path, **{"input.token_column": "tokens"})
    assert not DeltaTable.is_deltatable(str(tmp_path / "sequences"))
    # a lock left by a process that is gone is taken over
    (tmp_path / LOCK_NAME).write_text(json.dumps({"run_id": "run-dead", "pid": 2**22 + 12345,
                                                  "host": os.uname().nodename, "started": "then"}))
    pack(spark, [tokenized], tmp_path, **{"input.token_column": "tokens"})
    assert not (tmp_path / LOCK_NAME).exists()


def test_an_unreadable_lock_stops_the_run_with_a_message(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")  # a run killed between creating and writing its lock
    with pytest.raises(RunLockedError, match="lock cannot be read.*delete .*_bfpack.lock"):
        with OutputLock(str(tmp_path), "run-x"):
            pass


def test_orphans_of_a_killed_run_are_removed_and_never_read(spark, tokenized, reference, tmp_path):
    settings = {"input.token_column": "tokens", "output.mode": "append"}
    pack(spark, [tokenized], tmp_path, **settings)
    orphan = tmp_path / "sequences" / "run-killed0-0badc0de"
    orphan.mkdir()
    pq.write_table(pa.table({"seq_id": [10**9]}), orphan / "part-0.parquet")
    young = tmp_path / "sequences" / "run-killed1-0badc0de"  # may belong to a run in progress
    young.mkdir()
    eight_days_ago = time.time() - 8 * 24 * 3600
    os.utime(orphan, (eight_days_ago, eight_days_ago))
    assert read_table(spark, str(tmp_path / "sequences")).filter("seq_id = 1000000000").count() == 0
    pack(spark, [tokenized], tmp_path.with_name(tmp_path.name + "-other"), **settings)  # another root: not this one's
    # any later run on this root cleans up
    pack(spark, [tokenized / "part-000.parquet"], tmp_path, **settings)
    assert not orphan.exists() and young.exists()


def test_cleanup_keeps_files_the_table_reads_when_history_is_gone(spark, tokenized, tmp_path):
    """After log cleanup the history no longer names old attempts; the snapshot still reads them."""
    from deltalake import DeltaTable

    settings = {"input.token_column": "tokens", "output.mode": "append"}
    pack(spark, [tokenized / "part-000.parquet"], tmp_path, **settings)
    pack(spark, [tokenized / "part-001.parquet"], tmp_path, **settings)
    seqs = DeltaTable(str(tmp_path / "sequences"))
    seqs.create_checkpoint()
    (tmp_path / "sequences" / "_delta_log" / "00000000000000000000.json").unlink()
    old = time.time() - 8 * 24 * 3600
    for d in (tmp_path / "sequences").glob("run-*"):
        os.utime(d, (old, old))
    pack(spark, [tokenized / "part-002.parquet"], tmp_path, **settings)
    assert DeltaTable(str(tmp_path / "sequences")).to_pyarrow_table().num_rows > 0


def test_append_after_another_run_overwrote_adds_the_rows_again(spark, tokenized, tmp_path):
    a = {"input.token_column": "tokens", "output.mode": "append"}
    first = pack(spark, [tokenized / "part-000.parquet"], tmp_path, **a)
    pack(spark, [tokenized / "part-001.parquet"], tmp_path, **{**a, "output.mode": "overwrite"})
    again = pack(spark, [tokenized / "part-000.parquet"], tmp_path, **a)
    assert not again.already_committed and again.run_id == first.run_id
    runs = set(DeltaTable(str(tmp_path / "sequences")).to_pandas()["run_id"])
    assert first.run_id in runs and len(runs) == 2


def test_one_core_gives_the_same_tables_as_two(spark, tokenized, reference, tmp_path):
    """Same input and config on a separate Spark with one core (a fresh process, its own session)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "bfpack_spark.cli", "pack-tokenized", "-q", "--input", str(tokenized),
         "--output", str(tmp_path), "--seq-len", str(L), "--mode", "append", "--master", "local[1]",
         "--max-document-bytes", "200000", "--max-reject-fraction", "1"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "incubator modules" not in done.stderr and "default log level" not in done.stderr  # a quiet console
    same_tables(spark, reference, tmp_path)


def test_documents_the_tokenizer_makes_nothing_of_are_rejected(spark, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"]))
    tok.save(str(tmp_path / "ws.json"))
    write_jsonl(tmp_path / "c.jsonl", [{"id": "1", "text": "hello world"}, {"id": "2", "text": "   \n\t "}])
    result = pack(spark, [tmp_path / "c.jsonl"], tmp_path / "out", **{
        "tokenizer.tokenizer": str(tmp_path / "ws.json"), "tokenizer.append_eos": False})
    s = result.stats
    assert (s["documents_read"], s["documents_packed"], s["documents_rejected"]) == (2, 1, 1)
    reasons = DeltaTable(str(tmp_path / "out" / "rejects")).to_pyarrow_table().column("reason").to_pylist()
    assert reasons == ["no tokens: the tokenizer made nothing of this text"]


def test_an_empty_corpus_makes_empty_tables(spark, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    result = pack(spark, [tmp_path / "empty.jsonl"], tmp_path / "out")
    assert result.stats["audit_passed"] and result.stats["sequences"] == 0
    for name in ("sequences", "documents", "rejects", "stats"):
        assert DeltaTable.is_deltatable(str(tmp_path / "out" / name))


def test_append_to_a_stats_table_of_the_old_schema_migrates_it(spark, tokenized, tmp_path):
    """Output roots written before stats was typed (JSON strings) take appends: stats is
    rewritten in the new schema, old rows kept; another table's foreign schema stops the run."""
    from deltalake import write_deltalake

    from bfpack_spark.io.tables.read import DeltaError
    from bfpack_spark.schemas import STATS

    old_fields = [f for f in STATS if not f.name.startswith("audit_") and not f.name.endswith("_histogram")]
    old_fields = [pa.field("truncations_by_length", pa.string()) if f.name == "truncations_by_length" else f
                  for f in old_fields] + [pa.field("audit", pa.string())]
    old = {f.name: None for f in old_fields}
    old.update(run_id="run-old", seq_len=L, documents_read=7, audit_passed=True, stage_seconds=[("read", 1.5)],
               truncations_by_length=json.dumps([{"length": "1-63", "documents": 7, "truncations_per_document": 0.0,
                                                   "concat_truncations_per_document": 0.5}]),
               audit=json.dumps({"passed": True, "checks": {"rows": True}, "found": {"rows": 3},
                                  "expected": {"rows": 3}}))
    write_deltalake(str(tmp_path / "stats"), pa.Table.from_pylist([old], schema=pa.schema(old_fields)))
    pack(spark, [tokenized], tmp_path, **{"output.mode": "append", "input.token_column": "tokens"})
    rows = {r["run_id"]: r for r in
            pads.dataset(DeltaTable(str(tmp_path / "stats")).file_uris(), format="parquet").to_table().to_pylist()}
    assert len(rows) == 2 and rows["run-old"]["documents_read"] == 7
    assert rows["run-old"]["truncations_by_length"][0]["concat_truncations_per_document"] == 0.5
    assert dict(rows["run-old"]["audit_checks"]) == {"rows": True}
    new = next(r for k, r in rows.items() if k != "run-old")
    assert new["audit_passed"] and all(dict(new["audit_checks"]).values()) and new["truncations_by_length"]
    write_deltalake(str(tmp_path / "rejects"), pa.table({"something": ["else"]}), mode="overwrite",
                    schema_mode="overwrite")
    with pytest.raises(DeltaError, match="another table schema.*--mode overwrite"):
        pack(spark, [tokenized], tmp_path, **{"output.mode": "append", "output.run_id": "run-next",
                                              "input.token_column": "tokens"})


def test_incremental_runs_pack_only_new_files(spark, tmp_path, inject):
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    corpus.mkdir()
    for name, n in (("a", 30), ("b", 20)):
        write_jsonl(corpus / f"{name}.jsonl", [{"id": f"{name}-{i}", "text": f"document {i} of {name} " * (i + 1)}
                                               for i in range(n)])
    settings = {"output.mode": "incremental", "quality.max_reject_fraction": 0.0}
    first = pack(spark, [corpus], out, **settings)
    assert first.stats["documents_read"] == 50
    write_jsonl(corpus / "c.jsonl", [{"id": f"c-{i}", "text": f"the third file, document {i}"} for i in range(7)])
    inject({"commit:stats": "always"})  # killed after every other table took the new run's rows
    with pytest.raises(Exception, match="injected failure"):
        pack(spark, [corpus], out, **settings)
    inject({})
    second = pack(spark, [corpus], out, **settings)
    assert second.stats["documents_read"] == 7 and second.stats["mode"] == "incremental"
    documents = pads.dataset(DeltaTable(str(out / "documents")).file_uris(), format="parquet").to_table()
    ids = documents.column("doc_id").to_pylist()
    assert len(ids) == len(set(ids)) == 57
    inputs = pads.dataset(DeltaTable(str(out / "inputs")).file_uris(), format="parquet").to_table().to_pylist()
    assert sorted((r["source"], r["run_id"] == second.run_id) for r in inputs) == [
        ("a.jsonl", False), ("b.jsonl", False), ("c.jsonl", True)]
    third = pack(spark, [os.path.relpath(corpus)], out, **settings)  # the same files, spelled otherwise
    assert third.nothing_new
    assert DeltaTable(str(out / "stats")).version() == 1  # nothing committed
    write_jsonl(corpus / "a.jsonl", [{"id": "a-0", "text": "changed"}])
    with pytest.raises(InputError, match=r"a\.jsonl changed after run .*--repack-changed"):
        pack(spark, [corpus], out, **settings)

    # --repack-changed: the first run (a and b) is packed again and its rows replaced; killed
    # after the new run committed, before the old rows were all removed, the next run finishes it
    inject({"remove:sequences": "always"})
    with pytest.raises(Exception, match="injected failure"):
        pack(spark, [corpus], out, **settings, **{"output.repack_changed": True})
    inject({})
    assert pack(spark, [corpus], out, **settings, **{"output.repack_changed": True}).nothing_new

    def table(name):  # the project's reader: a table without files still has its columns
        return snapshot_dataset(str(out / name)).to_table()

    ids = table("documents").column("doc_id").to_pylist()
    assert sorted(ids) == sorted(["a-0"] + [f"b-{i}" for i in range(20)] + [f"c-{i}" for i in range(7)])
    runs = set(table("stats").column("run_id").to_pylist())
    assert first.run_id not in runs and len(runs) == 2
    for name in ("sequences", "documents", "inputs", "rejects"):
        assert first.run_id not in set(table(name).column("run_id").to_pylist())
    inputs = {r["source"]: r for r in table("inputs").to_pylist()}
    assert {k: r["replaces"] for k, r in inputs.items()} == {"a.jsonl": first.run_id, "b.jsonl": first.run_id,
                                                           "c.jsonl": None}
    n_tokens = [sum(table(name).column("n_tokens").to_pylist()) for name in ("sequences", "documents")]
    assert n_tokens[0] == n_tokens[1]
    packed = sorted(d for ds_ in table("sequences").column("doc_ids").to_pylist() for d in ds_)
    assert sorted(set(packed)) == sorted(ids)


def test_an_older_rejects_table_gains_the_new_column_on_append(spark, tokenized, tmp_path):
    from deltalake import write_deltalake

    from bfpack_spark.schemas import REJECTS

    old = pa.schema([f for f in REJECTS if f.name != "reason_code"])
    write_deltalake(str(tmp_path / "rejects"), pa.Table.from_pylist(
        [{"run_id": "run-old", "source": "x", "row": 1, "doc_id": "d", "reason": "malformed JSON", "excerpt": "{"}],
        schema=old))
    pack(spark, [tokenized], tmp_path, **{"output.mode": "append", "input.token_column": "tokens"})
    table = pads.dataset(DeltaTable(str(tmp_path / "rejects")).file_uris(), format="parquet").to_table()
    assert "reason_code" in DeltaTable(str(tmp_path / "rejects")).schema().to_arrow().names
    assert table.num_rows >= 1


def test_append_rejects_the_ids_an_earlier_run_packed(spark, tmp_path):
    """duplicate_ids: skip holds across the runs of an output root (a join with `documents`)."""
    write_jsonl(tmp_path / "a.jsonl", [{"id": f"x{i}", "text": f"first text {i}"} for i in range(10)])
    write_jsonl(tmp_path / "b.jsonl", [{"id": f"x{i}", "text": f"second text {i}"} for i in range(5, 15)]
                + [{"id": "x12", "text": "a copy within the run"}])
    out = tmp_path / "out"
    first = pack(spark, [tmp_path / "a.jsonl"], out)
    second = pack(spark, [tmp_path / "b.jsonl"], out, **{"output.mode": "append"})
    assert second.stats["documents_read"] == 11 and second.stats["documents_rejected"] == 6

    def table(name):
        return pads.dataset(DeltaTable(str(out / name)).file_uris(), format="parquet").to_table().to_pylist()

    ids = [r["doc_id"] for r in table("documents")]
    assert sorted(ids) == sorted(f"x{i}" for i in range(15))
    rejects = {(r["doc_id"], r["reason"], r["excerpt"]) for r in table("rejects")}
    row = {i: len("".join(json.dumps({"id": f"x{k}", "text": f"first text {k}"}) + "\n" for k in range(i)))
           for i in range(10)}
    assert rejects == {(f"x{i}", f"duplicate id; first seen in a.jsonl (run {first.run_id}) at byte {row[i]}",
                        f"second text {i}") for i in range(5, 10)} | {
        ("x12", f"duplicate id; first seen in b.jsonl at byte {(tmp_path / 'b.jsonl').read_text().index('x12') - 8}",
         "a copy within the run")}
    assert pack(spark, [tmp_path / "b.jsonl"], out, **{"output.mode": "append"}).already_committed
    kept = pack(spark, [tmp_path / "b.jsonl"], tmp_path / "keep", **{"quality.duplicate_ids": "keep"})
    assert kept.stats["documents_rejected"] == 0
