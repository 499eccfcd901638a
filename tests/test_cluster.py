"""A real Spark standalone cluster (master and worker from pyspark's own bin/spark-class, on
loopback): separate executor JVMs and Python workers give the same tables as local mode."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from chispa import assert_df_equality
from deltalake import DeltaTable

from bfpack_spark.io.tables.read import read_table

from corpora import bos_tokenizer, write_jsonl, write_masked, write_tokenized


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """spark://127.0.0.1:<port> with one worker of 2 cores, stopped after the module."""
    import pyspark

    home = os.path.dirname(pyspark.__file__)
    logs = tmp_path_factory.mktemp("cluster-logs")
    env = {**os.environ, "SPARK_HOME": home, "PYSPARK_PYTHON": sys.executable, "SPARK_LOG_DIR": str(logs)}
    port, ui, worker_ui = _free_port(), _free_port(), _free_port()
    spark_class = os.path.join(home, "bin", "spark-class")
    master = subprocess.Popen([spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                               "--port", str(port), "--webui-port", str(ui)], env=env,
                              stdout=open(logs / "master.log", "w"), stderr=subprocess.STDOUT)
    worker = subprocess.Popen([spark_class, "org.apache.spark.deploy.worker.Worker", f"spark://127.0.0.1:{port}",
                               "--host", "127.0.0.1", "--cores", "2", "--memory", "4g", "--webui-port",
                               str(worker_ui), "--work-dir", str(logs / "work")], env=env,
                              stdout=open(logs / "worker.log", "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=2) as r:
                    if json.load(r).get("aliveworkers", 0) >= 1:
                        break
            except (OSError, ValueError, http.client.HTTPException):  # not up yet, or not a whole JSON page yet
                pass
            if time.time() > deadline:
                pytest.fail(f"the standalone cluster did not start: {(logs / 'worker.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield f"spark://127.0.0.1:{port}", env
    finally:
        for p in (worker, master):
            p.terminate()
        for p in (worker, master):
            p.wait(timeout=30)


def _cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "bfpack_spark.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _run_id(out: Path) -> set[str]:
    return set(DeltaTable(str(out / "stats")).to_pandas()["run_id"])


def _same_tables(spark, a: Path, b: Path) -> None:
    for name in ("sequences", "documents", "rejects"):
        assert_df_equality(read_table(spark, str(a / name)), read_table(spark, str(b / name)), ignore_row_order=True)


def test_a_standalone_cluster_packs_what_local_mode_packs(spark, cluster, tmp_path):
    master, env = cluster
    corpus = tmp_path / "tokens"
    write_tokenized(corpus, n_files=3, docs_per_file=1500, median=200, seed=3, row_group=300)
    common = ["pack-tokenized", "-q", "--input", str(corpus), "--seq-len", "512",
              "--target-items-per-partition", "1000", "--merge-items-per-partition", "200"]
    _cli([*common, "--output", str(tmp_path / "cluster"), "--master", master], env)
    _cli([*common, "--output", str(tmp_path / "local"), "--master", "local[2]"], env)
    assert _run_id(tmp_path / "cluster") == _run_id(tmp_path / "local")
    _same_tables(spark, tmp_path / "cluster", tmp_path / "local")
    stats = DeltaTable(str(tmp_path / "cluster" / "stats")).to_pandas().iloc[0]
    assert stats["audit_passed"] and stats["merge_rounds"] >= 1 and stats["input_groups"] > 2


def test_a_standalone_cluster_tokenizes_and_rejects_like_local_mode(spark, cluster, tmp_path):
    master, env = cluster
    corpus = tmp_path / "text"
    corpus.mkdir()
    for f in range(3):
        write_jsonl(corpus / f"part-{f}.jsonl", [{"id": f"d{f}-{i}", "text": f"document {i} " + "word " * (i * 7 % 300)}
                                                 for i in range(400)] + ['{"id": "bad"', {"id": "d0-1", "text": "dup"}])
    common = ["pack", "-q", "--input", str(corpus), "--seq-len", "256", "--target-items-per-partition", "200"]
    _cli([*common, "--output", str(tmp_path / "cluster"), "--master", master], env)
    _cli([*common, "--output", str(tmp_path / "local"), "--master", "local[2]"], env)
    assert _run_id(tmp_path / "cluster") == _run_id(tmp_path / "local")
    _same_tables(spark, tmp_path / "cluster", tmp_path / "local")
    rejects = DeltaTable(str(tmp_path / "cluster" / "rejects")).to_pandas()
    assert len(rejects) == 6  # a malformed line per file, and the repeated id d0-1 in every file


def test_a_capped_plan_with_bos_and_loss_masks_on_a_standalone_cluster_equals_local_mode(spark, cluster, tmp_path):
    master, env = cluster
    write_masked(tmp_path / "masked", n_files=3, docs_per_file=400, median=30, vocab=(3, 250))
    tokenizer = bos_tokenizer(tmp_path / "tokenizer.json", ["best fit packing of documents into sequences"] * 50)
    common = ["pack-tokenized", "-q", "--input", str(tmp_path / "masked"), "--token-column", "tokens",
              "--loss-mask-column", "loss_mask", "--tokenizer", str(tokenizer), "--append-eos", "--seq-len", "128",
              "--max-segments-per-sequence", "5", "--target-items-per-partition", "300",
              "--merge-items-per-partition", "150"]
    _cli([*common, "--output", str(tmp_path / "cluster"), "--master", master], env)
    _cli([*common, "--output", str(tmp_path / "local"), "--master", "local[2]"], env)
    assert _run_id(tmp_path / "cluster") == _run_id(tmp_path / "local")
    _same_tables(spark, tmp_path / "cluster", tmp_path / "local")
    stats = DeltaTable(str(tmp_path / "cluster" / "stats")).to_pandas().iloc[0]
    assert stats["audit_passed"] and stats["merge_rounds"] >= 1 and stats["most_segments"] == 5
    assert 0 < stats["loss_tokens"] < stats["tokens"]


@pytest.mark.parametrize("stage", ["read", "assemble"])
def test_an_executor_killed_mid_stage_and_the_run_equals_local_mode(spark, cluster, tmp_path, stage):
    """The executor JVM running a task of the stage is killed (SIGKILL, as a lost node); Spark starts
    another and runs the lost tasks again: the tables equal local mode's."""
    master, env = cluster
    corpus = tmp_path / "tokens"
    write_tokenized(corpus, n_files=2, docs_per_file=600, median=150, seed=7)
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({stage: "kill-executor"}))
    common = ["pack-tokenized", "-q", "--input", str(corpus), "--seq-len", "512",
              "--target-items-per-partition", "400"]
    _cli([*common, "--output", str(tmp_path / "cluster"), "--master", master,
          "--spark-conf", f"spark.executorEnv.BFPACK_FAULTS_FILE={faults}"], env)
    assert (tmp_path / f"faults.json.{stage}.fired").exists()  # an executor was killed
    _cli([*common, "--output", str(tmp_path / "local"), "--master", "local[2]"], env)
    assert _run_id(tmp_path / "cluster") == _run_id(tmp_path / "local")
    _same_tables(spark, tmp_path / "cluster", tmp_path / "local")


def test_a_run_whose_driver_is_lost_resumes_on_a_standalone_cluster(cluster, tmp_path):
    """The driver of a cluster run killed (its process group: the executors are the worker's) in the
    assembly; the same command on the cluster reuses what the executors finished, and its tables equal
    an undisturbed local run's."""
    from test_resume import GROUPS, killed, records, rows, run, write_corpus

    master, env = cluster
    corpus = write_corpus(tmp_path / "corpus")
    killed(corpus, tmp_path / "cluster", {"assemble:3": "hang"},
           lambda out, log: records(out, "assemble") == GROUPS - 1, tmp_path, "--master", master, env=env)
    done = run(corpus, tmp_path / "cluster", "--master", master, env=env)
    assert f"resumed: {GROUPS} of {GROUPS} read tasks, {GROUPS - 1} of {GROUPS} assembly groups" in done.stdout
    run(corpus, tmp_path / "local", env=env)
    for name in ("sequences", "documents", "rejects", "inputs"):
        assert rows(tmp_path / "cluster", name) == rows(tmp_path / "local", name), name

