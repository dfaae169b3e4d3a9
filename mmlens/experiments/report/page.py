"""A self-contained HTML report of an information-flow run, rebuilt from its saved tables.

    build_report("runs/flow-20250101-120000")      # reads flow.csv, dropped.csv,
                                                    # emergence.csv, run.json; writes report.html

Figures (plotly, its script inlined once so the file opens offline): flows to the last
position; image to question; related vs other image patches to the question (each with its
random control when the run has one); every flow per task; answer emergence per reading and
per task (with a tuned lens, its reading beside the logit lens). Every caption is computed
from the tables (``mmlens.experiments.report.captions``). Under each example view, its flows and its
question's words: clicking a word shows its causal map over the image in the picked flow's
window, beside the example's curve for that flow (``mmlens.experiments.report.word_picker``).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd

from mmlens.experiments.controls import control_flow, is_control
from mmlens.experiments.knockouts import parse_flow
from mmlens.experiments.report.answers import answer_figures, answer_tables, has_free_form
from mmlens.experiments.report.captions import (
    LENSES,
    VARIANT_LABELS,
    emergence_caption,
    flow_caption,
    lens_comparison_caption,
)
from mmlens.experiments.report.word_picker import PICKER_SCRIPT, word_picker
from mmlens.experiments.runfolder.atomic import write_atomic
from mmlens.experiments.summary import flow_summary
from mmlens.plotting import knockout_curves, lens_trajectories
from mmlens.plotting.views import example_view_figure, view_caption

SECTIONS = (
    ("Flows to the last position", ("image->last", "question->last", "last->last")),
    ("Image to question", ("image->question",)),
    ("Related vs other image patches to the question", ("related->question", "other->question")),
)
READINGS = {
    "paper": "the paper's reading: hidden states times the unembedding, no norm (layer 0: "
             "the embeddings; the last layer: the model's output)",
    "final_norm": "with the final norm (the usual logit lens)",
    "no_norm": "after each layer, no norm",
    "tuned": "through the run's tuned lens (a trained translator per layer, then the final "
             "norm)",
}
AXES = {"paper": "hidden_states index (0: the embeddings, L: the output)"}
REQUIRED = ("flow.csv", "dropped.csv", "emergence.csv")


def build_report(run_dir: str | Path) -> Path:
    """Write ``report.html`` into ``run_dir`` from the tables a run saved there."""
    from mmlens.experiments.tables import check_run_folder

    run_dir = Path(run_dir)
    # a run of free-form tasks only has no one-word tables (mmlens.experiments.report.answers)
    one_word = not has_free_form(run_dir) or (run_dir / "flow.csv").is_file()
    missing = [name for name in REQUIRED if one_word and not (run_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir} lacks {', '.join(missing)}: pass the output folder "
                                "of `mmlens flow` (rerun it with --out there to finish the run)")
    summary = check_run_folder(run_dir)  # tables, run.json and store of one finished run
    flow, dropped, emergence = (
        [pd.read_csv(run_dir / name) for name in REQUIRED] if one_word else
        [pd.DataFrame(columns=["example_id", "task", "flow", "layer", "rel_change"]),
         pd.DataFrame(columns=["example_id", "task", "flow", "reason"]), pd.DataFrame()])
    window, n_layers = summary.get("window"), summary.get("n_layers")
    value = "change" if "change" in flow.columns else "rel_change"
    unit = "%" if value == "rel_change" else ""
    value_title = ("relative change in probability (%)" if value == "rel_change"
                   else f"change in {summary.get('metric', value)}")
    seed = (summary.get("arguments") or {}).get("seed", 0)
    peaks = flow_summary(flow, value=value, seed=seed) if not flow.empty else pd.DataFrame()
    parts = [_header(summary, flow, dropped)]
    figures = []
    shown: set[str] = set()
    names = set(flow["flow"])

    def curves(rows: pd.DataFrame, title: str):
        return knockout_curves(rows, title=title, value=value, window=window,
                               value_title=value_title)

    for title, flows in SECTIONS:
        present = [name for name in flows if name in names]
        if present:
            with_controls = present + [control_flow(parse_flow(f)).name for f in present
                                       if control_flow(parse_flow(f)).name in names]
            shown.update(with_controls)
            rows = flow[flow["flow"].isin(with_controls)].drop(columns="task")
            note = " ".join(flow_caption(peaks, f, window, n_layers, unit) for f in present)
            figures.append((title, note, curves(rows, title)))
    others = [name for name in dict.fromkeys(flow["flow"]) if name not in shown]
    if others:
        rows = flow[flow["flow"].isin(others)].drop(columns="task")
        note = " ".join(flow_caption(peaks, f, window, n_layers, unit) for f in others
                        if not is_control(f))
        figures.append(("Other flows", note, curves(rows, "Other flows")))
    if not flow.empty:
        figures.append(("Every flow per task", "One panel per task; the summary table below "
                        "gives each task's peak.", curves(flow, "Every flow per task")))
    figures += _view_figures(run_dir)
    figures += _emergence_figures(emergence)
    figures += answer_figures(run_dir, summary)
    for index, (title, note, figure, *picker) in enumerate(figures):
        div_id, after = picker or (None, "")
        parts.append(f"<h2>{html.escape(title)}</h2><p>{html.escape(note)}</p>")
        parts.append(figure.to_html(full_html=False, div_id=div_id,
                                    include_plotlyjs="inline" if index == 0 else False) + after)
    if any(len(entry) > 3 and entry[4] for entry in figures):
        parts.append(PICKER_SCRIPT)
    parts.append(_tables(peaks, dropped, unit))
    parts.append(answer_tables(run_dir))
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>mmlens information flow"
            "</title><style>body{font-family:sans-serif;max-width:1200px;margin:auto}"
            "table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
            "</style></head><body>" + "\n".join(parts) + "</body></html>")
    return write_atomic(run_dir / "report.html", page)


def _view_figures(run_dir: Path) -> list:
    """One example per task: image, related patches, the question's attention, and the
    picker of its words' causal maps."""
    path = run_dir / "views.json"
    if not path.is_file():
        return []
    return [(f"Example: {view['task']}", view_caption(view), example_view_figure(view),
             f"view-{index}", word_picker(view, f"view-{index}"))
            for index, view in enumerate(json.loads(path.read_text()))]


def _emergence_figures(emergence: pd.DataFrame) -> list:
    """Per reading over all tasks, then per task in the paper's reading."""
    if emergence.empty:
        return []
    labelled = emergence.assign(label=emergence["variant"].map(VARIANT_LABELS))
    explain = ("Probability at the last position of the first token of: the gold answer in "
               "lowercase and capitalised form, and for choose-questions the wrong option in "
               "both forms. ")
    figures = []
    for reading, name in READINGS.items():
        rows = labelled[labelled["reading"] == reading]
        if not rows.empty:
            title = f"Answer emergence, {name}"
            figures.append((title, explain + emergence_caption(rows),
                            lens_trajectories(rows, title=title, by="label",
                                              xaxis_title=AXES.get(reading, "layer"))))
    lenses = labelled[labelled["reading"].isin(list(LENSES))]
    if set(lenses["reading"]) == set(LENSES):
        # the answer in the form the model gives: the likelier one at the output
        output = lenses[(lenses["reading"] == "final_norm")
                        & (lenses["layer"] == lenses["layer"].max())
                        & lenses["variant"].isin(["lower", "capitalised"])]
        variant = output.groupby("variant")["prob"].mean().idxmax()
        both = lenses[lenses["variant"] == variant]
        title = "Answer emergence: the tuned lens beside the logit lens"
        figures.append((title, lens_comparison_caption(both, VARIANT_LABELS[variant]),
                        lens_trajectories(both.assign(label=both["reading"].map(LENSES)),
                                          title=title, by="label")))
    paper = labelled[labelled["reading"] == "paper"]
    for task, rows in paper.groupby("task", sort=True):
        title = f"Answer emergence, {task} (the paper's reading)"
        figures.append((title, emergence_caption(rows),
                        lens_trajectories(rows, title=title, by="label",
                                          xaxis_title=AXES["paper"])))
    return figures


def _header(summary: dict, flow: pd.DataFrame, dropped: pd.DataFrame) -> str:
    arguments = summary.get("arguments", {})
    facts = {
        "model": arguments.get("model"), "data": arguments.get("data"),
        "tasks": ", ".join(sorted(set(flow["task"].astype(str))
                                  | set(dropped["task"].astype(str)))),
        "examples kept": flow["example_id"].nunique(),
        "examples dropped": int((dropped["flow"] == "all").sum()),
        "layers": summary.get("n_layers"), "window": summary.get("window"),
        "preset": summary.get("preset", "none") or "none",
        "template": summary.get("template"), "images": summary.get("preprocessing"),
        "tokenization": summary.get("tokenization"),
        "related patches": summary.get("related_rule"),
        "empty spans": summary.get("empty_spans"), "metric": summary.get("metric"),
        "control seed": summary.get("control_seed"),
        "filter decodes up to": summary.get("filter_max_new_tokens"),
        "word maps": {True: "computed", False: "not computed (--no-word-maps)",
                      "mixed": "computed by some shards only (others ran --no-word-maps): "
                      "a view without them says so"}.get(summary.get("word_maps")),
        "tuned lens": summary.get("tuned_lens") and (
            f"{arguments.get('tuned_lens')} (digest {summary['tuned_lens']})"),
        "seconds": summary.get("seconds"),
    }
    items = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>"
                    for k, v in facts.items() if v is not None)
    return ("<h1>Cross-modal information flow</h1><p>Change in the model's answer when "
            "attention from the target positions to the source positions is blocked in a "
            "window of layers around each centre layer; mean over examples with a 95% band. "
            "Rows named random_SOURCE are controls: as many random positions of the source's "
            f"modality blocked instead.</p><ul>{items}</ul>")


def _tables(peaks: pd.DataFrame, dropped: pd.DataFrame, unit: str) -> str:
    parts = []
    if not peaks.empty:
        peaks = peaks.sort_values(["flow", "task"])
        parts.append("<h2>Largest drop per flow and task</h2><p>peak_layer: centre layer of "
                     f"the largest mean drop; peak_change: that drop{' (%)' if unit else ''}; "
                     "half_start..half_end: the centre layers around it where the drop is at "
                     "least half as large; _low/_high: bootstrap 95% intervals.</p>"
                     + peaks.to_html(index=False, float_format="%.2f", na_rep=""))
    if not dropped.empty:
        kinds = dropped.assign(reason=dropped["reason"].str.split(" ").str[:2].str.join(" "))
        counts = (kinds.groupby(["task", "flow", "reason"]).size().rename("examples")
                  .reset_index())
        parts.append("<h2>Left out</h2><p>flow <i>all</i>: the whole example (e.g. answered "
                     "wrongly); otherwise only that flow (e.g. no related patches, or under "
                     "logit-diff no wrong option).</p>"
                     + counts.to_html(index=False))
    return "\n".join(parts)
