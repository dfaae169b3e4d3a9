"""A self-contained HTML report of an information-flow run, rebuilt from its saved tables.

    build_report("runs/flow-20250101-120000")      # reads flow.csv, dropped.csv,
                                                    # emergence.csv, run.json; writes report.html

Figures (plotly, its script inlined once so the file opens offline): flows to the last
position; image to question; related vs other image patches to the question; every flow per
task; answer emergence in lowercase vs capitalised form, with and without the final norm.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd

from mmlens.experiments.summary import flow_summary
from mmlens.plotting import knockout_curves, lens_trajectories

SECTIONS = (
    ("Flows to the last position", ("image->last", "question->last", "last->last"),
     "Blocking the question's path to the last position hurts in higher layers; the image's "
     "direct path to the last position matters little."),
    ("Image to question", ("image->question",),
     "General visual information flows into the question positions in lower layers."),
    ("Related vs other image patches to the question", ("related->question", "other->question"),
     "Patches of the objects the question is about matter in middle layers, the rest in lower "
     "layers."),
)
REQUIRED = ("flow.csv", "dropped.csv", "emergence.csv")


def build_report(run_dir: str | Path) -> Path:
    """Write ``report.html`` into ``run_dir`` from the tables a run saved there."""
    run_dir = Path(run_dir)
    missing = [name for name in REQUIRED if not (run_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir} lacks {', '.join(missing)}: pass the output folder "
                                "of `mmlens flow` (rerun it with --out there to finish the run)")
    flow = pd.read_csv(run_dir / "flow.csv")
    dropped = pd.read_csv(run_dir / "dropped.csv")
    emergence = pd.read_csv(run_dir / "emergence.csv")
    run_file = run_dir / "run.json"
    summary = json.loads(run_file.read_text()) if run_file.is_file() else {}
    parts = [_header(summary, flow, dropped)]
    figures = []
    shown: set[str] = set()
    for title, flows, note in SECTIONS:
        present = [name for name in flows if name in set(flow["flow"])]
        if present:
            shown.update(present)
            rows = flow[flow["flow"].isin(present)].drop(columns="task")
            figures.append((title, note, knockout_curves(rows, title=title)))
    others = [name for name in dict.fromkeys(flow["flow"]) if name not in shown]
    if others:
        rows = flow[flow["flow"].isin(others)].drop(columns="task")
        figures.append(("Other flows", "", knockout_curves(rows, title="Other flows")))
    if not flow.empty:
        figures.append(("Every flow per task", "One panel per task.",
                        knockout_curves(flow, title="Every flow per task")))
    for reading, name in (("paper", "the paper's reading (hidden states, no norm)"),
                          ("final_norm", "with the final norm (the usual logit lens)")):
        rows = emergence[(emergence["reading"] == reading)
                         & emergence["variant"].isin(["lower", "capitalised", "wrong"])]
        if not rows.empty:
            title = f"Answer emergence, {name}"
            figures.append((title, "Probability of the answer's first token at the last "
                            "position after each layer.",
                            lens_trajectories(rows.rename(columns={"variant": "label"}),
                                              title=title)))
    for index, (title, note, figure) in enumerate(figures):
        parts.append(f"<h2>{html.escape(title)}</h2><p>{html.escape(note)}</p>")
        parts.append(figure.to_html(full_html=False,
                                    include_plotlyjs="inline" if index == 0 else False))
    parts.append(_tables(flow, dropped))
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>mmlens information flow"
            "</title><style>body{font-family:sans-serif;max-width:1200px;margin:auto}"
            "table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
            "</style></head><body>" + "\n".join(parts) + "</body></html>")
    path = run_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _header(summary: dict, flow: pd.DataFrame, dropped: pd.DataFrame) -> str:
    arguments = summary.get("arguments", {})
    facts = {
        "model": arguments.get("model"), "data": arguments.get("data"),
        "tasks": ", ".join(sorted(set(flow["task"].astype(str))
                                  | set(dropped["task"].astype(str)))),
        "examples kept": flow["example_id"].nunique(),
        "examples dropped": int((dropped["flow"] == "all").sum()),
        "layers": summary.get("n_layers"), "window": summary.get("window"),
        "seconds": summary.get("seconds"),
    }
    items = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>"
                    for k, v in facts.items() if v is not None)
    return ("<h1>Cross-modal information flow</h1><p>Relative change (%) in the probability "
            "of the model's answer when attention from the target positions to the source "
            "positions is blocked in a window of layers around each centre layer; mean over "
            f"examples with a 95% band.</p><ul>{items}</ul>")


def _tables(flow: pd.DataFrame, dropped: pd.DataFrame) -> str:
    parts = []
    if not flow.empty:
        peaks = flow_summary(flow).sort_values(["flow", "task"])
        parts.append("<h2>Largest drop per flow and task</h2><p>peak_layer: centre layer of "
                     "the largest mean drop; peak_change: that drop (%); half_start..half_end: "
                     "the layers around it where the drop is at least half as large.</p>"
                     + peaks.to_html(index=False, float_format="%.1f"))
    if not dropped.empty:
        kinds = dropped.assign(reason=dropped["reason"].str.split(" ").str[:2].str.join(" "))
        counts = (kinds.groupby(["task", "flow", "reason"]).size().rename("examples")
                  .reset_index())
        parts.append("<h2>Left out</h2><p>flow <i>all</i>: the whole example (e.g. answered "
                     "wrongly); otherwise only that flow (e.g. no related patches).</p>"
                     + counts.to_html(index=False))
    return "\n".join(parts)
