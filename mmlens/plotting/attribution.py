"""A figure of attribution-patching scores: one layer x position heatmap per activation."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots


def attribution_figure(frame: pd.DataFrame, labels: list[str] | None = None) -> go.Figure:
    """Heatmaps of ``attribution_patching``'s frame: layer x position per ``name``; per-head
    activations (``z``) show layer x head, summed over positions. ``labels`` names the
    positions (e.g. ``batch.str_tokens[0]``). The title names each panel's largest score."""
    missing = {"name", "layer", "pos", "score"} - set(frame.columns)
    if missing:
        raise ValueError(f"attribution_figure needs columns name, layer, pos, score; missing "
                         f"{', '.join(sorted(missing))}")
    if frame.empty:
        raise ValueError("attribution_figure got no rows")
    names = list(dict.fromkeys(frame["name"]))
    titles, tables = [], []
    for name in names:
        rows = frame[frame["name"] == name]
        per_head = "head" in rows.columns and rows["head"].notna().any()
        column = "head" if per_head else "pos"
        table = rows.groupby(["layer", column])["score"].sum().unstack(column)
        layer, at = table.stack().abs().idxmax()
        top = float(table.loc[layer, at])
        where = f"head {at}" if per_head else f"pos {at}"
        if labels is not None and not per_head and not name.startswith("vision"):
            where += f" ({labels[at]!r})"
        titles.append(f"{name}: largest {top:+.3g} at layer {layer}, {where}")
        tables.append((table, column, name))
    figure = make_subplots(rows=len(names), cols=1, subplot_titles=titles,
                           vertical_spacing=0.12 if len(names) > 1 else 0.0)
    for row, (table, column, name) in enumerate(tables, start=1):
        bound = float(table.abs().max().max()) or 1.0
        x = list(table.columns)
        if (labels is not None and column == "pos" and not name.startswith("vision")
                and len(labels) >= len(x)):
            x = [f"{p}: {labels[p]}" for p in x]
        figure.add_trace(go.Heatmap(z=table.values, x=x, y=list(table.index),
                                    colorscale="RdBu", zmid=0, zmin=-bound, zmax=bound,
                                    colorbar={"len": 1 / len(names),
                                              "y": 1 - (row - 0.5) / len(names)}),
                         row=row, col=1)
        figure.update_xaxes(title_text=column, row=row, col=1)
        figure.update_yaxes(title_text="layer", row=row, col=1)
    figure.update_layout(height=320 * len(names), title="attribution patching "
                         "(clean - corrupted) . gradient at the corrupted run")
    return figure
