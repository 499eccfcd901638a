"""A run that loses its driver picks up where it stopped: the driver's process group (its JVM and Python
workers too) is killed with SIGKILL in the read, in the plan and in the assembly; the same command then
reuses what the tasks finished and commits the tables an undisturbed run commits."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bfpack_spark.io.tables.read import snapshot_dataset

from corpora import write_jsonl

L = 256
GROUPS = 8
TABLES = ("sequences", "documents", "rejects", "inputs")
WORDS = ["resume", "where", "it", "stopped", "driver", "killed", "tokens", "kept", "the", "of", "a"]


def write_corpus(root: Path) -> Path:
    """16 JSON-lines files of text, a few rejects among them."""
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for f in range(16):
        lines: list = [{"id": f"f{f}-{i}", "text": " ".join(rng.choice(WORDS, int(rng.lognormal(4, 1.1)) + 1))}
                       for i in range(150)]
        lines[5] = '{"id": "broken'  # a reject: malformed JSON
        write_jsonl(root / f"part-{f:02d}.jsonl", lines)
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("resume-corpus"))


def args(corpus: Path, out, *extra: str) -> list[str]:
    master = [] if "--master" in extra else ["--master", "local[2]"]
    return [sys.executable, "-m", "bfpack_spark.cli", "pack", "--input", str(corpus), "--output", str(out),
            "--seq-len", str(L), "--target-items-per-partition", "1000000", "--min-partitions", str(GROUPS),
            *master, *extra]


def run(corpus: Path, out, *extra: str, env=None) -> subprocess.CompletedProcess:
    done = subprocess.run(args(corpus, out, *extra), capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def killed(corpus: Path, out, faults: dict, ready, tmp_path, *extra: str, env=None) -> None:
    """Start the command with ``faults`` armed, wait until ``ready(out, stderr so far)``, then SIGKILL its
    process group: the driver, its JVM and the Python workers, as a lost master would lose them."""
    path = tmp_path / "faults.json"
    path.write_text(json.dumps(faults))
    log = open(tmp_path / "killed.log", "w+")
    extra = (*extra, "--spark-conf", f"spark.executorEnv.BFPACK_FAULTS_FILE={path}")  # executors of a cluster
    proc = subprocess.Popen(args(corpus, out, *extra), stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
                            env={**os.environ, **(env or {}), "BFPACK_FAULTS_FILE": str(path)})
    try:
        deadline = time.monotonic() + 300
        while not ready(out, (tmp_path / "killed.log").read_text()):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the point to kill it at"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL


def records(out, stage: str) -> int:
    return len(list(Path(out).glob(f"_bfpack_work/*/done/{stage}-*.json")))


def rows(root, name: str) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in snapshot_dataset(f"{root}/{name}").to_table()
                  .to_pylist())


@pytest.fixture(scope="module")
def undisturbed(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("undisturbed") / "out"
    done = run(corpus, out)
    assert "resumed:" not in done.stdout
    assert snapshot_dataset(f"{out}/stats").to_table().column("input_groups")[0].as_py() == GROUPS
    return out


@pytest.mark.parametrize("stage, faults, ready, resumed", [
    ("read", {"read:5": "hang"}, lambda out, log: records(out, "read") == GROUPS - 1, (GROUPS - 1, 0)),
    ("plan", {"plan": "hang"}, lambda out, log: "stage plan ..." in log, (GROUPS, 0)),
    ("assembly", {"assemble:3": "hang"}, lambda out, log: records(out, "assemble") == GROUPS - 1,
     (GROUPS, GROUPS - 1)),
])
def test_a_run_killed_with_its_driver_resumes_and_commits_the_undisturbed_tables(corpus, undisturbed, tmp_path,
                                                                                 stage, faults, ready, resumed):
    out = tmp_path / "out"
    killed(corpus, out, faults, ready, tmp_path)
    assert not any((out / t / "_delta_log").exists() for t in TABLES)  # nothing was committed
    if stage == "plan":  # as if killed before the duplicates were found: the read's rows are made from the work
        [found] = out.glob("_bfpack_work/*/done/duplicates-*.json")
        found.unlink()
    done = run(corpus, out)
    assert (f"resumed: {resumed[0]} of {GROUPS} read tasks, {resumed[1]} of {GROUPS} assembly groups"
            in done.stdout), done.stdout
    by_driver = f"read: all {GROUPS} groups taken from what an earlier attempt of the run recorded" in done.stderr
    assert by_driver == (stage != "read"), done.stderr  # every group's record: no read task runs
    for name in TABLES:
        assert rows(out, name) == rows(undisturbed, name), name
    stats = snapshot_dataset(f"{out}/stats").to_table().to_pylist()[0]
    assert (stats["resumed_read_groups"], stats["resumed_assembly_groups"]) == resumed and stats["audit_passed"]
    assert not (out / "_bfpack_work").exists()  # committed: the workspace went
    for name in TABLES:  # and so did every staged file no commit added
        read = {u.split(f"/{name}/")[1] for u in snapshot_dataset(f"{out}/{name}").files}
        staged = {str(p.relative_to(out / name)) for p in (out / name).glob("run-*/**/*.parquet")}
        assert staged == read, name


def test_changed_settings_start_afresh_and_no_resume_too(corpus, undisturbed, tmp_path):
    out = tmp_path / "out"
    killed(corpus, out, {"assemble:3": "hang"}, lambda out, log: records(out, "assemble") == GROUPS - 1,
           tmp_path)
    other = run(corpus, out, "--residual-fill", "0.98")  # another config: another run
    assert "did not finish here and is not resumed: its settings differ" in other.stderr
    assert "resumed:" not in other.stdout
    killed(corpus, tmp_path / "again", {"assemble:3": "hang"},
           lambda out, log: records(out, "assemble") == GROUPS - 1, tmp_path)
    fresh = run(corpus, tmp_path / "again", "--no-resume")
    assert "starting afresh (--no-resume)" in fresh.stderr and "resumed:" not in fresh.stdout
    for name in TABLES:
        assert rows(tmp_path / "again", name) == rows(undisturbed, name), name


def test_damaged_work_is_done_again(corpus, undisturbed, tmp_path):
    """A reused output is checked first: a group's tokens cut short and a staged file gone are done again."""
    out = tmp_path / "out"
    killed(corpus, out, {"assemble:3": "hang"}, lambda out, log: records(out, "assemble") == GROUPS - 1, tmp_path)
    [work] = (out / "_bfpack_work").iterdir()
    stored = work / "groups" / "0000001.arrow"
    stored.write_bytes(stored.read_bytes()[:-100])
    first = json.loads((work / "done" / "assemble-0000000.json").read_text())
    (out / "documents" / json.loads(next(f for f in first["files"] if '"documents"' in f))["path"]).unlink()
    done = run(corpus, out)
    assert f"resumed: {GROUPS - 1} of {GROUPS} read tasks, {GROUPS - 2} of {GROUPS} assembly groups" in done.stdout
    for name in TABLES:
        assert rows(out, name) == rows(undisturbed, name), name


def test_resumed_on_s3(corpus, undisturbed, tmp_path, s3_server):
    s3_server.create_bucket(Bucket="resume")
    out = "s3://resume/out"

    def ready(out, log):
        found = s3_server.list_objects_v2(Bucket="resume", Prefix="out/_bfpack_work/").get("Contents", [])
        return sum("/done/assemble-" in o["Key"] for o in found) == GROUPS - 1

    killed(corpus, out, {"assemble:3": "hang"}, ready, tmp_path)
    done = run(corpus, out)
    assert f"resumed: {GROUPS} of {GROUPS} read tasks, {GROUPS - 1} of {GROUPS} assembly groups" in done.stdout
    for name in ("sequences", "documents", "rejects"):
        mine = sorted(json.dumps({k: v for k, v in r.items() if k != "run_id"}, sort_keys=True, default=str)
                      for r in snapshot_dataset(f"{out}/{name}").to_table().to_pylist())
        theirs = sorted(json.dumps({k: v for k, v in r.items() if k != "run_id"}, sort_keys=True, default=str)
                        for r in snapshot_dataset(f"{undisturbed}/{name}").to_table().to_pylist())
        assert mine == theirs, name  # the same rows; on S3 the files' versions, hence the run id, differ
    assert "Contents" not in s3_server.list_objects_v2(Bucket="resume", Prefix="out/_bfpack_work/")
