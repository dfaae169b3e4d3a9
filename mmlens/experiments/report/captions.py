"""Report text computed from a run's tables: what each curve shows, in numbers.

    flow_caption(summary, "question->last", window=7, unit="%")
    emergence_caption(emergence_rows)

Nothing here is a fixed claim about the results; sentences about the paper are labelled as
the paper's (``PAPER_NOTES``). An emergence curve with several equally high peaks (equal to
rounding, ``PEAK_TOLERANCE``) is captioned with every one of them; a flow's caption names the
summary's peak, the earliest of equally large drops (``mmlens.experiments.summary``).
"""

from __future__ import annotations

import pandas as pd

from mmlens.experiments.controls import control_flow
from mmlens.experiments.knockouts import parse_flow
from mmlens.methods.windows import window_layers

PAPER_NOTES = {
    "image->question": "general visual information flows into the question in lower layers",
    "related->question": "the asked-about objects' patches matter most in middle layers",
    "other->question": "the other patches matter mostly in lower layers",
    "question->last": "the question passes the fused information to the last position in "
                      "higher layers",
    "image->last": "the image's direct path to the last position matters little",
    "last->last": "blocking the last position from itself changes almost nothing",
}
VARIANT_LABELS = {
    "lower": "answer, lowercase", "capitalised": "answer, capitalised",
    "wrong": "wrong option, lowercase", "wrong_capitalised": "wrong option, capitalised",
}


PEAK_TOLERANCE = 1e-6


def peak_layers(curve: pd.Series) -> list[int]:
    """The layers (index) where ``curve`` reaches its maximum, one per separate peak: of a run
    of adjacent layers at the maximum, the first."""
    at_top = (curve - curve.max()).abs() <= PEAK_TOLERANCE * max(1.0, abs(curve.max()))
    starts = at_top & ~at_top.shift(1, fill_value=False)
    return [int(layer) for layer in curve.index[starts.to_numpy()]]


def _layers_text(layers: list[int]) -> str:
    if len(layers) == 1:
        return f"layer {layers[0]}"
    return "layers " + ", ".join(str(layer) for layer in layers[:-1]) + f" and {layers[-1]}"


def _num(value: float, unit: str) -> str:
    return f"{value:+.1f}{unit}" if unit == "%" else f"{value:+.3f}{unit}"


def flow_caption(summary: pd.DataFrame, flow: str, window: int | None, n_layers: int | None,
                 unit: str = "%") -> str:
    """One paragraph on ``flow`` from ``flow_summary`` rows: peak, size, interval, range,
    per-task peaks where they differ, and its random control where there is one."""
    rows = summary[summary["flow"] == flow]
    overall = rows[rows["task"] == "all"]
    if overall.empty:
        return ""
    row = overall.iloc[0]
    if pd.isna(row["peak_change"]):
        return f"{flow}: no values to summarise."
    layer = int(row["peak_layer"])
    window_text = ""
    if window and n_layers:
        blocked = window_layers(layer, window, n_layers)
        window_text = f" (blocking layers {blocked[0]}..{blocked[-1]})"
    if row["peak_change"] >= 0:
        text = (f"{flow}: blocking it never lowers the answer on average; its largest mean "
                f"change is {_num(row['peak_change'], unit)} at centre layer {layer}.")
    else:
        text = (f"{flow}: the largest mean drop is {_num(row['peak_change'], unit)} (95% CI "
                f"{_num(row['peak_change_low'], unit)} to {_num(row['peak_change_high'], unit)})"
                f" at centre layer {layer}{window_text}")
        if not pd.isna(row["half_start"]):
            text += (f"; at least half of it from centre layer {int(row['half_start'])} to "
                     f"{int(row['half_end'])}")
        text += f"; {int(row['n_examples'])} examples."
    tasks = rows[rows["task"] != "all"].dropna(subset=["peak_layer"])
    spread = tasks[(tasks["peak_layer"] - layer).abs() > 1]
    if len(tasks) > 1 and not spread.empty:
        text += " Per task the peak moves: " + ", ".join(
            f"{r.task} at layer {int(r.peak_layer)} ({_num(r.peak_change, unit)})"
            for r in tasks.itertuples()) + "."
    control = summary[(summary["flow"] == control_flow(parse_flow(flow)).name)
                      & (summary["task"] == "all")]
    if not control.empty and not pd.isna(control.iloc[0]["peak_change"]):
        c = control.iloc[0]
        text += (f" Its random control (as many random positions of the same modality) "
                 f"reaches {_num(c['peak_change'], unit)} at centre layer {int(c['peak_layer'])}.")
    if flow in PAPER_NOTES:
        text += f" The paper reports: {PAPER_NOTES[flow]}."
    return text


def emergence_caption(rows: pd.DataFrame) -> str:
    """Where each tracked form peaks and which leads, from one reading's emergence rows."""
    if rows.empty:
        return ""
    means = rows.groupby(["variant", "layer"])["prob"].mean().unstack("variant")
    parts = []
    for variant in [v for v in VARIANT_LABELS if v in means.columns]:
        curve = means[variant].dropna()
        if curve.empty:
            continue
        layers = peak_layers(curve)
        each = " each" if len(layers) > 1 else ""
        parts.append(f"{VARIANT_LABELS[variant]} peaks at {_layers_text(layers)} "
                     f"(mean p {curve.max():.2f}{each})")
    text = "; ".join(parts) + "."
    if {"lower", "capitalised"} <= set(means.columns):
        lead = means["lower"] > means["capitalised"]
        if lead.any():
            text += (f" The lowercase form leads from layer {int(lead.idxmax())}")
            later = lead[lead.idxmax():]
            if (~later).any():
                text += (f" until layer {int((~later).idxmax())}, when the capitalised form "
                         "takes over")
            text += "."
        else:
            text += " The lowercase form never leads the capitalised one."
    n = rows["example_id"].nunique()
    return text + f" Mean over {n} examples; the paper reports the lowercase answer first."


LENSES = {"final_norm": "logit lens", "tuned": "tuned lens"}


def lens_comparison_caption(rows: pd.DataFrame, label: str) -> str:
    """Where one tracked token (``label``, e.g. "answer, capitalised") peaks through the logit
    lens and through the tuned lens, and where the two differ most, from its emergence rows of
    those two readings."""
    means = rows.groupby(["reading", "layer"])["prob"].mean().unstack("reading")
    parts = []
    for reading, name in LENSES.items():
        curve = means[reading].dropna() if reading in means.columns else pd.Series()
        if not curve.empty:
            parts.append(f"through the {name} it peaks at {_layers_text(peak_layers(curve))} "
                         f"(mean p {curve.max():.3g})")
    if not parts:
        return ""
    text = (f"The probability at the last position of the {label} (the form the model gives): "
            + "; ".join(parts) + ".")
    if set(LENSES) <= set(means.columns):
        gap = (means["tuned"] - means["final_norm"]).dropna()
        if not gap.empty:
            layer = int(gap.abs().idxmax())
            tuned, logit = means["tuned"][layer], means["final_norm"][layer]
            text += (f" The readings differ most at layer {layer} (tuned {tuned:.3g} vs logit "
                     f"lens {logit:.3g}).")
    return text + f" Mean over {rows['example_id'].nunique()} examples."
