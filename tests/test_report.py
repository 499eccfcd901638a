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
    """A clean run's rejects table has no file; the report reads it as empty, not as a crash, and says so in
    words (not as an empty plot)."""
    write_jsonl(tmp_path / "clean.jsonl", [{"id": f"c{i}", "text": "word " * (i + 1)} for i in range(20)])
    run(load_config(None, {"input.paths": [str(tmp_path / "clean.jsonl")], "output.output": str(tmp_path / "out"),
                           "packing.seq_len": 64}), spark)
    proc = bfpack("report", str(tmp_path / "out"), "--html", str(tmp_path / "r.html"))
    assert proc.returncode == 0 and "run-" in proc.stdout, proc.stderr[-2000:]
    page = (tmp_path / "r.html").read_text()
    assert "<strong>No rejects.</strong>" in page and 'alt="rejects"' not in page
    assert 'alt="runs"' not in page and "1 run so far" in page and "<table>" in page  # one run: a table
    assert 'alt="loss"' not in page  # no loss masks: no plot of them


def test_html_report_shows_a_plot_only_where_there_is_data(root, tmp_path):
    from bfpack_spark.report import RUNS_TO_PLOT, load_runs, rejects_by_reason

    page = tmp_path / "r.html"
    proc = bfpack("report", str(root), "--html", str(page))
    assert proc.returncode == 0, proc.stderr
    text = page.read_text()
    runs = load_runs(str(root))
    shown = {"truncations": True, "documents by length": True, "fill": True, "segments": True,
             "rejects": bool(rejects_by_reason(str(root), runs[-1]["run_id"])), "runs": len(runs) >= RUNS_TO_PLOT,
             "loss": runs[-1]["loss_tokens"] is not None}
    for name, there in shown.items():
        assert (f'alt="{name}" src="data:image/png;base64,' in text) == there, name
    assert "<script" not in text and "http" not in text.split("<body>", 1)[1]  # self-contained
    assert bfpack("report", str(tmp_path / "nothing")).returncode == 2


def test_the_report_page_in_a_browser_is_a_grid_of_readable_plots(spark, tmp_path):
    """Headless Chromium: at 1400 px the plots stand two or more to a row, each at least 560 px wide; in a
    narrow window, one to a row, the window's width. Screenshots beside the page, in the test's output."""
    from browser import measure, screenshot

    write_jsonl(tmp_path / "a.jsonl", [{"id": f"a{i}", "text": "word " * (30 * i + 1)} for i in range(80)]
                + ['{"id": "broken", "text": '])
    settings = {"output.output": str(tmp_path / "out"), "packing.seq_len": 256, "quality.max_reject_fraction": 0.5}
    for i in range(3):  # three runs: runs over time is a plot; the last, the one plotted, has a reject
        write_jsonl(tmp_path / f"b{i}.jsonl", [{"id": f"b{i}-{j}", "text": "more " * (j + 5)} for j in range(40)])
        paths = [str(tmp_path / "a.jsonl")] if i == 2 else [str(tmp_path / f"b{i}.jsonl")]
        run(load_config(None, {**settings, "input.paths": paths, "output.mode": "append"}), spark)
    page = tmp_path / "report.html"
    assert bfpack("report", str(tmp_path / "out"), "--html", str(page)).returncode == 0
    text = page.read_text()
    assert all(f'alt="{n}"' in text for n in ("truncations", "fill", "segments", "rejects", "runs"))
    layout = """const boxes = [...document.querySelectorAll('figure img')].map(i => i.getBoundingClientRect());
                return {lefts: [...new Set(boxes.map(b => Math.round(b.left)))], widths: boxes.map(b => b.width),
                        page: document.documentElement.scrollWidth, window: window.innerWidth};"""
    wide = measure(page, layout, 1400)
    assert len(wide["lefts"]) >= 2 and min(wide["widths"]) >= 560, wide
    assert wide["page"] <= wide["window"], wide  # nothing wider than the window
    narrow = measure(page, layout, 700)
    assert len(narrow["lefts"]) == 1 and min(narrow["widths"]) >= 600 and narrow["page"] <= narrow["window"], narrow
    for width in (1400, 700):
        assert screenshot(page, tmp_path / f"report-{width}.png", width, 2200).stat().st_size > 20_000


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
