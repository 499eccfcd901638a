"""``bfpack report``: what the runs under an output root did, in the terminal or as one HTML page.

Everything comes from the ``stats`` table (a row per run, with the histograms the writing
tasks counted) and the ``rejects`` table's reasons, read with pyarrow's dataset API from the
files of each table's Delta snapshot (that path exits cleanly every time; see the README).
The plot functions take plain lists, so the notebook draws the same figures from Spark SQL.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pyarrow.dataset as ds

from bfpack_spark.io.formats.base import reason_code
from bfpack_spark.io.store.fs import join
from bfpack_spark.io.tables.read import DeltaError, output_table, table_dataset

_COLUMNS = ["run_id", "started_at", "mode", "strategy", "seq_len", "documents_read", "documents_packed",
            "documents_rejected", "tokens", "sequences", "lower_bound", "mean_fill", "truncations_per_document",
            "concat_truncations_per_document", "truncations_by_length", "fill_histogram", "segments_histogram",
            "audit_passed", "max_segments_per_sequence", "most_segments", "loss_tokens", "no_loss_tokens",
            "tokenizer_engine"]


def _dataset(root: str, table: str) -> ds.Dataset:
    return table_dataset(output_table(join(root, table)))


def load_runs(root: str) -> list[dict[str, Any]]:
    """Every run's stats row, oldest first (columns an older version did not write: None)."""
    stats = _dataset(root, "stats")
    present = [c for c in _COLUMNS if c in stats.schema.names]
    runs = stats.to_table(columns=present).to_pylist()
    return sorted(({c: r.get(c) for c in _COLUMNS} for r in runs), key=lambda r: r["started_at"] or "")


def sequence_contents(run: dict) -> str:
    """What the run's sequences hold besides tokens, in a line: the cap on segments against the most
    one sequence holds, and the tokens with and without loss (runs with loss masks)."""
    cap, most = run.get("max_segments_per_sequence"), run.get("most_segments")
    parts = [f"segments per sequence: at most {cap:,} (cap), most in one {most or 0:,}" if cap
             else f"segments per sequence: no cap, most in one {most:,}" if most else ""]
    loss, no_loss = run.get("loss_tokens"), run.get("no_loss_tokens")
    if loss is not None:
        total = loss + (no_loss or 0)
        parts.append(f"tokens with loss {loss:,} ({loss / max(total, 1):.1%}), without {no_loss or 0:,}")
    return "; ".join(p for p in parts if p)


def rejects_by_reason(root: str, run_id: str | None = None) -> dict[str, int]:
    """Rejects counted by their ``reason_code`` (derived from the reason, so rows written before the
    column existed count too), streamed batch by batch."""
    counts: Counter[str] = Counter()
    filter_ = ds.field("run_id") == run_id if run_id else None
    for batch in _dataset(root, "rejects").to_batches(columns=["reason"], filter=filter_):
        counts.update(reason_code(r) for r in batch.column(0).to_pylist())
    return dict(counts.most_common())


def _cells(r: dict) -> dict[str, str]:
    """A run's figures as the history shows them (the terminal's and the page's)."""
    return {"started": (r["started_at"] or "")[:19].replace("T", " "), "mode": r["mode"] or "",
            "read": f"{r['documents_read'] or 0:,}", "packed": f"{r['documents_packed'] or 0:,}",
            "rejected": f"{r['documents_rejected'] or 0:,}", "sequences": f"{r['sequences'] or 0:,}",
            "bound": f"{r['lower_bound'] or 0:,}", "trunc": f"{r['truncations_per_document'] or 0:.4f}",
            "concat": f"{r['concat_truncations_per_document'] or 0:.4f}",
            "audit": "passed" if r["audit_passed"] else "FAILED", "run": r["run_id"]}


def history(runs: Sequence[dict]) -> str:
    """The run history, one line per run."""
    head = (f"{'started (UTC)':<19} {'mode':<11} {'read':>11} {'packed':>11} {'rejected':>9} {'sequences':>11} "
            f"{'bound':>11} {'trunc/doc':>9} {'concat':>7}  audit   run")
    lines = [head]
    for c in map(_cells, runs):
        lines.append(f"{c['started']:<19} {c['mode']:<11} {c['read']:>11} {c['packed']:>11} {c['rejected']:>9} "
                     f"{c['sequences']:>11} {c['bound']:>11} {c['trunc']:>9} {c['concat']:>7}  {c['audit']:<6}  "
                     f"{c['run']}")
    return "\n".join(lines)


# --- plots: plain data in, a matplotlib Figure out ---------------------------------------------

#: Runs over time are a table below this many runs (two lone dots say nothing), a plot from it.
RUNS_TO_PLOT = 3


def _axes(title: str, xlabel: str, ylabel: str, width: float = 6.4):
    import matplotlib.pyplot as plt  # with no display, matplotlib picks its file-only backend itself

    fig, ax = plt.subplots(figsize=(width, 3.8), dpi=150)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    return fig, ax


def plot_truncations(by_length: Sequence[dict]):
    """Truncations per document by document length, best-fit against concatenation (the paper's figure)."""
    fig, ax = _axes("Truncations per document, by document length", "document length (tokens)",
                    "truncations per document")
    labels = [b["length"] for b in by_length]
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], [b["concat_truncations_per_document"] for b in by_length], 0.4,
           label="concatenate and cut", color="#c44e52")
    ax.bar([i + 0.2 for i in x], [b["truncations_per_document"] for b in by_length], 0.4,
           label="best-fit packing", color="#4c72b0")
    ax.set_xticks(list(x), labels, rotation=45, ha="right")
    ax.set_yscale("symlog", linthresh=0.01)  # short documents: 0 against a fraction of one
    top = max([b["concat_truncations_per_document"] for b in by_length] + [b["truncations_per_document"]
                                                                          for b in by_length] + [1])
    ax.set_ylim(0, top * 3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_documents_by_length(by_length: Sequence[dict]):
    fig, ax = _axes("Documents by length", "document length (tokens)", "documents")
    ax.bar(range(len(by_length)), [b["documents"] for b in by_length], color="#55a868")
    ax.set_xticks(range(len(by_length)), [b["length"] for b in by_length], rotation=45, ha="right")
    fig.tight_layout()
    return fig


def plot_fill(fill_histogram: Sequence[int]):
    fig, ax = _axes("Sequence fill", "tokens / L (percent)", "sequences")
    ax.bar(range(len(fill_histogram)), fill_histogram, 1.0, color="#4c72b0")
    ax.set_yscale("symlog")
    fig.tight_layout()
    return fig


def plot_segments(segments_histogram: Sequence[int], cap: int | None = None):
    """Sequences by segment count (the last bar counts that many or more), and the cap where one is set."""
    last = max((i for i, n in enumerate(segments_histogram) if n), default=1)
    fig, ax = _axes("Segments per sequence" + (f" (cap {cap})" if cap else ""), "documents or chunks in the sequence",
                    "sequences")
    ax.bar(range(last + 1), segments_histogram[:last + 1], color="#8172b2")
    ax.set_yscale("symlog")
    if cap:
        ax.axvline(cap + 0.5, color="#c44e52", linestyle="--", label=f"max_segments_per_sequence = {cap}")
        ax.legend()
    fig.tight_layout()
    return fig


def plot_rejects(by_reason: dict[str, int]):
    fig, ax = _axes("Rejects by reason", "records", "")
    names = list(by_reason)[::-1]
    ax.barh(names, [by_reason[n] for n in names], color="#dd8452")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_runs(runs: Sequence[dict]):
    fig, ax = _axes("Runs over time", "run started (UTC)", "per run")
    x = range(len(runs))
    ax.plot(x, [r["documents_packed"] or 0 for r in runs], "o-", label="documents packed")
    ax.plot(x, [r["sequences"] or 0 for r in runs], "s--", label="sequences")
    ax.set_xticks(list(x), [(r["started_at"] or "")[:16].replace("T", " ") for r in runs], rotation=30, ha="right")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_loss(loss_tokens: int, no_loss_tokens: int):
    """Tokens with and without loss (runs with loss masks: prompts, or a mask column)."""
    fig, ax = _axes("Tokens with and without loss", "tokens", "", width=6.4)
    ax.barh(["without loss (mask 0)", "with loss (mask 1)"], [no_loss_tokens, loss_tokens],
            color=["#937860", "#4c72b0"])
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def figures(runs: Sequence[dict], run: dict, by_reason: dict[str, int]) -> list[tuple[str, Any]]:
    """The report's plots, titled: only those with data to show. Truncations, documents by length, fill and
    segments for every run (but one written before the histograms); tokens with loss for a run with loss
    masks; rejects by reason where there are rejects; runs over time from RUNS_TO_PLOT runs (the page says
    the rest in words and tables)."""
    out = []
    if run["truncations_by_length"]:
        out += [("truncations", plot_truncations(run["truncations_by_length"])),
                ("documents by length", plot_documents_by_length(run["truncations_by_length"]))]
    if run["fill_histogram"]:
        out.append(("fill", plot_fill(run["fill_histogram"])))
    if run["segments_histogram"]:
        out.append(("segments", plot_segments(run["segments_histogram"], run.get("max_segments_per_sequence"))))
    if run.get("loss_tokens") is not None:
        out.append(("loss", plot_loss(run["loss_tokens"], run.get("no_loss_tokens") or 0)))
    if by_reason:
        out.append(("rejects", plot_rejects(by_reason)))
    if len(runs) >= RUNS_TO_PLOT:
        out.append(("runs", plot_runs(runs)))
    return out


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _runs_table(runs: Sequence[dict]) -> str:
    """The runs as an HTML table, newest first."""
    columns = {"started": "started (UTC)", "mode": "mode", "packed": "documents packed", "rejected": "rejected",
               "sequences": "sequences", "bound": "lower bound", "trunc": "truncations / doc", "concat": "concat",
               "audit": "audit", "run": "run"}
    head = columns.values()
    rows = []
    for cells in map(_cells, reversed(runs)):
        rows.append("<tr>" + "".join(f"<td>{html.escape(cells[c])}</td>" for c in columns) + "</tr>")
    return ("<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;padding:0 1.5em;max-width:1800px;color:#222}
h1{font-size:1.5em;overflow-wrap:anywhere}p.summary{font-size:1.05em;line-height:1.5}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,560px),1fr));gap:1.2em}
figure{margin:0;border:1px solid #e3e3e3;border-radius:6px;padding:.4em;background:#fff}
img{width:100%;height:auto;display:block}
.note{border:1px solid #e3e3e3;border-radius:6px;padding:1em 1.2em;background:#fafafa}
.tablewrap{overflow-x:auto}table{border-collapse:collapse;font-size:.92em}
th,td{padding:.35em .7em;border-bottom:1px solid #e3e3e3;text-align:right;white-space:nowrap}
th:last-child,td:last-child,th:nth-child(2),td:nth-child(2){text-align:left}
"""


def render_html(root: str, runs: Sequence[dict], run: dict, by_reason: dict[str, int]) -> str:
    """One self-contained page: the run's summary, its plots in a grid that fits the window, what has no
    plot in words (no rejects) or as a table (few runs), and the runs."""
    title = f"bfpack report: {root}"
    images = [f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{_png(fig)}"></figure>'
              for name, fig in figures(runs, run, by_reason)]
    if not by_reason:
        images.append('<div class="note"><strong>No rejects.</strong> Every record this run read was packed.</div>')
    summary = (f"run {run['run_id']}: {run['documents_packed'] or 0:,} documents in {run['sequences'] or 0:,} "
               f"sequences of L={run['seq_len']} (lower bound {run['lower_bound'] or 0:,}); truncations per "
               f"document {run['truncations_per_document'] or 0:.4f} with best-fit packing against "
               f"{run['concat_truncations_per_document'] or 0:.4f} with concatenation")
    if sequence_contents(run):
        summary += f"; {sequence_contents(run)}"
    few = (f"<p>{len(runs)} run{'s' if len(runs) > 1 else ''} so far: a plot of runs over time from "
           f"{RUNS_TO_PLOT} runs.</p>" if len(runs) < RUNS_TO_PLOT else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body><h1>{html.escape(title)}</h1><p class="summary">{html.escape(summary)}</p>
<h2>Run {html.escape(run['run_id'])}</h2><div class="grid">{"".join(images)}</div>
<h2>Runs</h2>{few}<div class="tablewrap">{_runs_table(runs)}</div></body></html>
"""


def report(root: str, html_path: str | None = None, run_id: str | None = None) -> str:
    """The terminal report (and, with ``html_path``, the page written there)."""
    runs = load_runs(root)
    if not runs:
        raise DeltaError(f"{root}/stats holds no run yet")
    chosen = [r for r in runs if run_id is None or r["run_id"] == run_id]
    if not chosen:
        raise DeltaError(f"{root}/stats has no run {run_id}; runs: {', '.join(r['run_id'] for r in runs)}")
    run = chosen[-1]
    by_reason = rejects_by_reason(root, run["run_id"])
    text = history(runs)
    if sequence_contents(run):
        text += f"\n\n{run['run_id']}: {sequence_contents(run)}"
    if by_reason:
        text += f"\n\nrejects of {run['run_id']} by reason: " + ", ".join(f"{k} {v:,}" for k, v in by_reason.items())
    if html_path:
        with open(html_path, "w", encoding="utf-8") as fh:
            fh.write(render_html(root, runs, run, by_reason))
        text += f"\n\nwrote {html_path}"
    return text
