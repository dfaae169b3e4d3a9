"""Curves and heatmaps over layers: knockout curves in the paper's style, logit-lens
trajectories, and layer x span (or position) heatmaps of patching results."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots
from torch import Tensor

Z_95 = 1.96


def mean_with_band(frame: pd.DataFrame, by: Sequence[str], value: str) -> pd.DataFrame:
    """Mean of ``value`` per group with a normal 95% confidence band (``low``, ``high``)."""
    stats = frame.groupby(list(by))[value].agg(["mean", "std", "count"]).reset_index()
    half = Z_95 * stats["std"].fillna(0.0) / np.sqrt(stats["count"])
    return stats.assign(low=stats["mean"] - half, high=stats["mean"] + half)


def knockout_curves(frame: pd.DataFrame, title: str = "attention knockout", *,
                    value: str = "rel_change", window: int | None = None,
                    value_title: str = "relative change in probability (%)") -> go.Figure:
    """Relative change in the answer's probability against the centre layer, one line per flow.

    ``frame`` has one row per example, flow and layer: columns ``flow``, ``layer``,
    ``value`` (``rel_change``, percent, by default) and optionally ``task`` (one panel per
    task). Lines are the mean over examples, shaded bands the 95% confidence interval, as in
    the paper's figures. ``window``: the window size, named on the layer axis.
    """
    missing = {"flow", "layer", value} - set(frame.columns)
    if missing:
        raise ValueError(f"knockout_curves needs columns flow, layer, {value}; missing "
                         f"{', '.join(sorted(missing))}")
    if frame.empty:
        raise ValueError("knockout_curves got no rows: every example was dropped (see "
                         "dropped_examples) or the flows were filtered out")
    tasks = list(dict.fromkeys(frame["task"])) if "task" in frame.columns else [None]
    flows = list(dict.fromkeys(frame["flow"]))
    colours = {flow: qualitative.Plotly[i % len(qualitative.Plotly)] for i, flow in
               enumerate(flows)}
    figure = make_subplots(rows=1, cols=len(tasks), shared_yaxes=True,
                           subplot_titles=[t for t in tasks if t is not None] or None)
    for column, task in enumerate(tasks, start=1):
        rows = frame if task is None else frame[frame["task"] == task]
        stats = mean_with_band(rows.dropna(subset=[value]), ["flow", "layer"], value)
        for flow in flows:
            curve = stats[stats["flow"] == flow].sort_values("layer")
            if curve.empty:
                continue
            _add_band(figure, curve, colours[flow], flow, column)
            figure.add_trace(go.Scatter(
                x=curve["layer"], y=curve["mean"], mode="lines", name=flow, legendgroup=flow,
                line={"color": colours[flow], "width": 2}, showlegend=column == 1),
                row=1, col=column)
        figure.add_hline(y=0, line={"color": "grey", "width": 1, "dash": "dot"}, row=1,
                         col=column)
        figure.update_xaxes(title_text="centre layer" + (f" (window {window})" if window else ""),
                            row=1, col=column, dtick=1 if frame["layer"].max() < 20 else None)
    figure.update_yaxes(title_text=value_title, row=1, col=1)
    figure.update_layout(title=title, template="simple_white", hovermode="x unified")
    return figure


def lens_trajectories(frame: pd.DataFrame, value: str = "prob",
                      title: str = "logit lens", by: str | None = None,
                      xaxis_title: str = "layer") -> go.Figure:
    """One line per token label against the layer, from ``lens.token_probabilities`` (lines by
    ``label``) or ``experiments.answer_emergence`` (lines by ``variant``).

    ``value`` is ``"prob"``, ``"logit"`` or ``"rank"``; the mean over examples and positions is
    drawn with a 95% band.
    """
    if by is None:
        by = "variant" if "label" not in frame.columns and "variant" in frame.columns else "label"
    missing = {by, "layer", value} - set(frame.columns)
    if missing:
        raise ValueError(f"lens_trajectories needs columns {by}, layer, {value}; missing "
                         f"{', '.join(sorted(missing))} (use lens.token_probabilities)")
    frame = frame.rename(columns={by: "label"}) if by != "label" else frame
    stats = mean_with_band(frame, ["label", "layer"], value)
    figure = go.Figure()
    for i, label in enumerate(dict.fromkeys(frame["label"])):
        curve = stats[stats["label"] == label].sort_values("layer")
        colour = qualitative.Plotly[i % len(qualitative.Plotly)]
        _add_band(figure, curve, colour, label, None)
        figure.add_trace(go.Scatter(x=curve["layer"], y=curve["mean"], mode="lines+markers",
                                    name=str(label), legendgroup=str(label),
                                    line={"color": colour}))
    figure.update_layout(title=title, xaxis_title=xaxis_title, yaxis_title=value,
                         template="simple_white")
    if value == "rank":
        figure.update_yaxes(type="log", autorange="reversed")
    return figure


def layer_span_heatmap(
    scores: Tensor | pd.DataFrame, labels: Sequence[str] | None = None, *,
    layers: Sequence[int] | None = None, column: str = "span", value: str = "metric",
    title: str | None = None,
) -> go.Figure:
    """Heatmap of a ``[layer, span]`` (or ``[layer, position]``) result.

    Takes the tensor from ``patch_spans`` / ``patch_positions`` (with ``labels`` for its
    columns and ``layers`` for its rows), or a tidy frame with columns ``layer``, ``column``
    and ``value`` (e.g. from ``patching_frame``).
    """
    if isinstance(scores, pd.DataFrame):
        table = scores.pivot_table(index="layer", columns=column, values=value, aggfunc="mean",
                                   sort=False)
        z, x, y = table.to_numpy(), [str(c) for c in table.columns], list(table.index)
    else:
        if scores.ndim != 2:
            raise ValueError(f"scores must be [layer, {column}], got shape {tuple(scores.shape)}")
        z = scores.detach().float().cpu().numpy()
        x = list(labels) if labels is not None else [str(i) for i in range(z.shape[1])]
        y = list(layers) if layers is not None else list(range(z.shape[0]))
        if len(x) != z.shape[1] or len(y) != z.shape[0]:
            raise ValueError(f"scores are {z.shape[0]} x {z.shape[1]} but got {len(y)} layers "
                             f"and {len(x)} labels")
    limit = float(np.nanmax(np.abs(z))) or 1.0
    figure = go.Figure(go.Heatmap(z=z, x=x, y=y, colorscale="RdBu", zmid=0, zmin=-limit,
                                  zmax=limit, colorbar={"title": value}))
    figure.update_layout(title=title or f"{value} by layer and {column}", xaxis_title=column,
                         yaxis_title="layer", template="simple_white")
    return figure


def _add_band(figure: go.Figure, curve: pd.DataFrame, colour: str, name: str,
              column: int | None) -> None:
    """A filled 95% band: along the upper edge and back along the lower one."""
    x = list(curve["layer"]) + list(curve["layer"])[::-1]
    y = list(curve["high"]) + list(curve["low"])[::-1]
    band = go.Scatter(x=x, y=y, fill="toself", fillcolor=colour, opacity=0.2, mode="none",
                      hoverinfo="skip", name=f"{name} 95% CI", legendgroup=str(name),
                      showlegend=False)
    if column is None:
        figure.add_trace(band)
    else:
        figure.add_trace(band, row=1, col=column)
