"""What users look at: bfpack report (terminal and HTML), typed stats in SQL, and the notebook."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from deltalake import DeltaTable

from bfpack_spark.config import load_config
from bfpack_spark.io.tables.read import read_table
from bfpack_spark.job import run

from corpora import write_jsonl

REPO = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def root(spark, tmp_path_factory):
    """The demo's output when CI made it (``bfpack demo`` runs first there), else a small run of our own."""
    demo = REPO / "out" / "demo"
    if DeltaTable.is_deltatable(str(demo / "stats")):
        return demo
    corpus, out = tmp_path_factory.mktemp("report-corpus"), tmp_path_factory.mktemp("report-out")
    write_jsonl(corpus / "docs.jsonl", [{"id": f"d{i}", "text": "word " * (40 * i + 1)} for i in range(120)]
                + ['{"id": "broken", "text": '])
    run(load_config(None, {"input.paths": [str(corpus)], "output.output": str(out), "packing.seq_len": 512,
                           "quality.max_reject_fraction": 0.5}), spark)
    return out


def bfpack(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bfpack_spark.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_report_exits_cleanly_ten_times_out_of_ten(root):
    for _ in range(10):
        proc = bfpack("report", str(root))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "passed" in proc.stdout and "run-" in proc.stdout


def test_report_of_a_run_without_rejects(spark, tmp_path):
    """A clean run's rejects table has no file; the report reads it as empty, not as a crash."""
    write_jsonl(tmp_path / "clean.jsonl", [{"id": f"c{i}", "text": "word " * (i + 1)} for i in range(20)])
    run(load_config(None, {"input.paths": [str(tmp_path / "clean.jsonl")], "output.output": str(tmp_path / "out"),
                           "packing.seq_len": 64}), spark)
    proc = bfpack("report", str(tmp_path / "out"), "--html", str(tmp_path / "r.html"))
    assert proc.returncode == 0 and "run-" in proc.stdout, proc.stderr[-2000:]


def test_html_report_embeds_every_plot(root, tmp_path):
    page = tmp_path / "r.html"
    proc = bfpack("report", str(root), "--html", str(page))
    assert proc.returncode == 0, proc.stderr
    text = page.read_text()
    for name in ("truncations", "documents by length", "fill", "segments", "rejects", "runs"):
        assert f'alt="{name}" src="data:image/png;base64,' in text, name
    assert "<script" not in text and "http" not in text.split("<body>", 1)[1]  # self-contained
    assert bfpack("report", str(tmp_path / "nothing")).returncode == 2


def test_stats_is_plain_sql(spark, root):
    read_table(spark, str(root / "stats")).createOrReplaceTempView("stats_sql")
    row = spark.sql("""
        SELECT first(documents_packed) AS packed, sum(t.documents) AS by_length,
               max(t.concat_truncations_per_document) AS worst_concat, first(audit_checks) AS checks
        FROM stats_sql LATERAL VIEW inline(truncations_by_length) t GROUP BY run_id""").collect()[0]
    assert row["packed"] == row["by_length"] and row["worst_concat"] > 0
    assert row["checks"] and all(row["checks"].values())


def test_the_notebook_executes(root):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(REPO / "notebooks" / "packing_stats.ipynb", as_version=4)
    os.environ["BFPACK_ROOT"] = str(root)
    try:
        nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    finally:
        del os.environ["BFPACK_ROOT"]
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 6


def test_the_docs_reader_examples_read_a_run_with_rejects(spark, root):
    page = (REPO / "docs" / "guide" / "outputs.md").read_text()
    example = page.split("```python", 1)[1].split("```", 1)[0].replace("out/demo", str(root))
    namespace: dict = {}
    exec(compile(example, "docs/guide/outputs.md", "exec"), namespace)
    assert len(namespace["stats"]) >= 1 and namespace["seqs"].num_rows > 0
