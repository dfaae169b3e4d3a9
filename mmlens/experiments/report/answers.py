"""The report's free-form section, from the tables ``mmlens.experiments.free_form.run`` saved.

Curves (``knockout_curves``: mean over examples, 95% band) of each measure in
``answer_run.METRICS`` per flow against the centre layer, per task; the change of each answer
token's log-probability (one line per flow and token place); the free-form examples' views;
captions computed from ``answer_peaks.csv`` (``flow_caption``); and the peaks table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from mmlens.experiments.free_form.run import METRICS
from mmlens.experiments.free_form.study import per_token_rows
from mmlens.experiments.report.captions import flow_caption
from mmlens.plotting import knockout_curves
from mmlens.plotting.views import example_view_figure, view_caption

SECTION_TITLE = "Free-form answers"


def has_free_form(run_dir: str | Path) -> bool:
    return (Path(run_dir) / "answer_flow.csv").is_file()


def answer_figures(run_dir: str | Path, summary: dict) -> list[tuple]:
    """``(title, caption, figure)`` of the free-form section; none without its tables."""
    run_dir = Path(run_dir)
    if not has_free_form(run_dir):
        return []
    section = summary.get("free_form", {})
    window, n_layers = section.get("window"), section.get("n_layers")
    tokens = pd.read_csv(run_dir / "answer_flow.csv")
    if tokens.empty:
        return []
    per_answer = pd.read_csv(run_dir / "answer_summary.csv")
    peaks = pd.read_csv(run_dir / "answer_peaks.csv")
    flows = list(dict.fromkeys(per_answer["flow"]))
    intro = (f"Answers teacher-forced ({section.get('forced', 'generated')}; filter: "
             f"{section.get('filter', '?')}); {section.get('n_kept')} of "
             f"{section.get('n_examples')} examples kept. Attention from the positions "
             "predicting the answer's tokens to the source span is blocked in the window "
             "around each centre layer. ")
    figures = []
    for index, (metric, axis) in enumerate(METRICS.items()):
        rows = peaks[peaks["metric"] == metric]
        unit = "%" if metric != "seq_logprob_change" else ""
        note = " ".join(flow_caption(rows, flow, window, n_layers, unit) for flow in flows)
        title = f"{SECTION_TITLE}: {axis}"
        figures.append((title, (intro if index == 0 else "") + note,
                        knockout_curves(per_answer, title=title, value=metric, window=window,
                                        value_title=axis)))
    token_rows = per_token_rows(tokens)
    for flow in flows:
        rows = token_rows[token_rows["flow"] == flow]
        curves = rows.drop(columns="flow").rename(columns={"token_flow": "flow"})
        title = f"{SECTION_TITLE}: {flow}, per answer token"
        figures.append((title, _token_caption(rows),
                        knockout_curves(curves, title=title, value="logprob_change",
                                        window=window,
                                        value_title="change in the token's log-probability")))
    path = run_dir / "answer_views.json"
    if path.is_file():
        figures += [(f"Example: {view['task']}", view_caption(view), example_view_figure(view))
                    for view in json.loads(path.read_text())]
    return figures


def _token_caption(rows: pd.DataFrame) -> str:
    """Per token place: the centre layer of its largest mean drop and that drop."""
    means = rows.groupby(["index", "layer"])["logprob_change"].mean()
    words = rows.groupby("index")["word"].agg(lambda w: w.value_counts().index[0])
    parts = []
    for index, curve in means.groupby(level=0):
        curve = curve.droplevel(0)
        layer = int(curve.idxmin())
        parts.append(f"token {index} (most often {words[index]!r}): largest mean drop "
                     f"{curve[layer]:+.3f} at centre layer {layer}")
    return "; ".join(parts) + "."


def answer_tables(run_dir: str | Path) -> str:
    """The peaks of every free-form measure and what was left out, as HTML."""
    run_dir = Path(run_dir)
    parts = []
    if (run_dir / "answer_peaks.csv").is_file():
        peaks = pd.read_csv(run_dir / "answer_peaks.csv").sort_values(["metric", "flow", "task"])
        parts.append(f"<h2>{SECTION_TITLE}: largest drop per measure, flow and task</h2>"
                     + peaks.to_html(index=False, float_format="%.2f", na_rep=""))
    if (run_dir / "answer_dropped.csv").is_file():
        dropped = pd.read_csv(run_dir / "answer_dropped.csv")
        if not dropped.empty:
            parts.append(f"<h2>{SECTION_TITLE}: left out</h2>"
                         + dropped.to_html(index=False))
    return "\n".join(parts)
