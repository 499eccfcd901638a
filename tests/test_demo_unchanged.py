"""No behaviour change from reshaping the house (the read path for many files, io/ by who runs it, typed
stage contracts): the demo's tables are the ones the code before it made, row for row, but for the run id
(which the input files' listing now makes, with their modification times: rewritten files are a new run)."""

import json
import shutil
import subprocess
import sys

import pytest

from bfpack_spark.io.tables.read import snapshot_dataset

#: the last commit before the reshaping
BEFORE = "27e1924"
TABLES = ("sequences", "documents", "rejects")


def rows(root, name: str) -> list[str]:
    table = snapshot_dataset(str(root / name)).to_table().drop_columns(["run_id"])
    return sorted(json.dumps(r, sort_keys=True) for r in table.to_pylist())


def demo(cwd, output) -> None:
    done = subprocess.run([sys.executable, "-m", "bfpack_spark.cli", "demo", "-q", "--output", str(output)],
                          cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_demo_tables_are_the_ones_the_code_before_the_reshaping_made(tmp_path):
    repo = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if repo.returncode != 0 or subprocess.run(["git", "cat-file", "-e", f"{BEFORE}^{{commit}}"],
                                              cwd=repo.stdout.strip(), capture_output=True).returncode != 0:
        pytest.skip(f"commit {BEFORE} is not in this clone's history")
    top = repo.stdout.strip()
    before = tmp_path / "before"
    subprocess.run(["git", "worktree", "add", "--detach", str(before), BEFORE], cwd=top, check=True,
                   capture_output=True)
    try:
        demo(before, tmp_path / "demo-before")  # python -m runs the package of its working directory
        demo(top, tmp_path / "demo-now")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=top, capture_output=True)
        shutil.rmtree(before, ignore_errors=True)
    for name in TABLES:
        assert rows(tmp_path / "demo-before", name) == rows(tmp_path / "demo-now", name), name
    assert len(rows(tmp_path / "demo-now", "sequences")) == 3740
