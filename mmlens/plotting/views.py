"""An example image with its related patches outlined and the question's attention over the
patch grid (the views ``mmlens.experiments.report.views`` saves).

A view's grid is ``rows`` x ``cols`` cells in row-major order over the whole image; views saved
before grids could be rectangular hold a square ``grid`` instead, and still draw.
"""

from __future__ import annotations

import base64
import io
import textwrap
from collections.abc import Mapping
from typing import Any

import numpy as np
import plotly.graph_objects as go
from PIL import Image


def view_shape(view: Mapping[str, Any]) -> tuple[int, int]:
    """``(rows, cols)`` of a view's grid (``grid`` x ``grid`` for an old view); raises when the
    view lacks a grid or its attention does not fill it."""
    task = view.get("task", "?")
    if "rows" in view and "cols" in view:
        rows, cols = int(view["rows"]), int(view["cols"])
    elif "grid" in view:
        rows = cols = int(view["grid"])
    else:
        raise ValueError(f"the view of task {task!r} has neither rows/cols nor grid: is it an "
                         "entry of a run folder's views.json?")
    n_values = len(view["attention"])
    if n_values != rows * cols:
        raise ValueError(f"the view of task {task!r} holds {n_values} attention values for a "
                         f"{rows}x{cols} grid: the views.json entry is damaged; rerun the study")
    bad = [i for i in view["related"] if not 0 <= int(i) < rows * cols]
    if bad:
        raise ValueError(f"the view of task {task!r} marks cell {bad[0]}, outside its "
                         f"{rows}x{cols} grid: the views.json entry is damaged; rerun the study")
    return rows, cols


OUTLINE = ({"color": "black", "width": 4}, {"color": "white", "width": 2})
"""A related cell's outline: white on a black border, visible on shapes of any colour."""
TITLE_CHAR_PX = 9  # a title character's width at plotly's default title font, generously


def example_view_figure(view: Mapping[str, Any]) -> go.Figure:
    """Two panels' worth in one: the image with white, black-bordered outlines on related
    cells and the attention heatmap laid over it (trace 1); the title wraps to the figure's
    width. A view with ``word_maps`` gets a third trace, hidden, for one word's causal map
    (``word_map_grid``): the report's word picker fills it."""
    rows, cols = view_shape(view)
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(view["image_png"]))))
    height, width = pixels.shape[:2]
    attention = np.asarray(view["attention"], dtype=float).reshape(rows, cols)
    step_x, step_y = width / cols, height / rows
    figure = go.Figure(go.Image(z=pixels, name="image"))
    figure.add_trace(go.Heatmap(
        z=attention, x=(np.arange(cols) + 0.5) * step_x, y=(np.arange(rows) + 0.5) * step_y,
        colorscale="Inferno", opacity=0.5, colorbar={"title": "attention"}, name="attention"))
    if view.get("word_maps"):
        first = word_map_grid(view, 0)
        bound = float(np.nanmax(np.abs(first))) or 1.0
        figure.add_trace(go.Heatmap(
            z=first, x=(np.arange(cols) + 0.5) * step_x, y=(np.arange(rows) + 0.5) * step_y,
            colorscale="RdBu", zmin=-bound, zmax=bound, opacity=0.6, visible=False,
            colorbar={"title": "relative change"}, name="causal map"))
    for line in OUTLINE:  # every border first, so no white line is covered by a neighbour's
        for index in view["related"]:
            row, col = divmod(int(index), cols)
            figure.add_shape(type="rect", x0=col * step_x, x1=(col + 1) * step_x,
                             y0=row * step_y, y1=(row + 1) * step_y, line=line)
    # Keep the image's aspect: the longer side gets 480 px.
    scale = 480 / max(width, height)
    figure_width = round(width * scale) + 80
    title = (f"{view['task']}: {view['question']} (gold {view['answer']!r}, "
             f"model {str(view.get('model_answer') or '').strip()!r})")
    lines = textwrap.wrap(title, width=figure_width // TITLE_CHAR_PX) or [""]
    figure.update_layout(title={"text": "<br>".join(lines), "x": 0.02, "xanchor": "left"},
                         template="simple_white", width=figure_width,
                         height=round(height * scale) + 40 + 24 * len(lines),
                         margin={"t": 40 + 24 * len(lines), "l": 20, "r": 20, "b": 20})
    figure.update_yaxes(autorange="reversed", scaleanchor="x", showticklabels=False)
    figure.update_xaxes(showticklabels=False)
    return figure


def word_map_grid(view: Mapping[str, Any], index: int) -> np.ndarray:
    """Word ``index``'s causal map as the view's ``rows x cols`` grid."""
    rows, cols = view_shape(view)
    values = np.asarray(view["word_maps"][index]["values"], dtype=float)
    if values.size != rows * cols:
        raise ValueError(f"the view of task {view.get('task', '?')!r} holds {values.size} map "
                         f"values for a {rows}x{cols} grid: the views.json entry is damaged; "
                         "rerun the study")
    return values.reshape(rows, cols)


def word_map_caption(view: Mapping[str, Any], index: int) -> str:
    """Where blocking the word's attention lowers the answer most, and in which layers."""
    entry = view["word_maps"][index]
    grid = word_map_grid(view, index)
    layers = entry["layers"]
    window = (f"layer {layers[0]}" if len(layers) == 1
              else f"layers {layers[0]}-{layers[-1]}")
    if not np.isfinite(grid).any():  # a relative change of an answer with no probability
        return (f"Blocking attention from {entry['word']!r} in {window}: no value, the answer's "
                f"clean probability is {entry['p_base']:.3g}.")
    row, col = divmod(int(np.nanargmin(grid)), grid.shape[1])
    return (f"Blocking attention from {entry['word']!r} to one image cell at a time in "
            f"{window}: largest drop {grid[row, col]:+.1%} of the answer's "
            f"probability ({entry['p_base']:.3f}) at row {row}, column {col}; largest rise "
            f"{np.nanmax(grid):+.1%}.")


def view_caption(view: Mapping[str, Any]) -> str:
    """How much of the question's attention to the image lands on the related cells."""
    rows, cols = view_shape(view)
    attention = np.asarray(view["attention"], dtype=float)
    related = [int(i) for i in view["related"]]
    total = attention.sum()
    cell = f" of {int(view['cell_px'])} px" if view.get("cell_px") else ""
    grid = f"{rows}x{cols} cells{cell}"
    if not related or total <= 0:
        return (f"No related patch in this example's grid ({grid}); the question's attention "
                f"is spread over {len(attention)} patches.")
    share = attention[related].sum() / total
    return (f"White outlines: the {len(related)} related patches of {len(attention)} ({grid}). "
            f"They draw {share:.0%} of the question's attention to the image (mean over "
            f"layers, heads and question tokens), against {len(related) / len(attention):.0%} "
            "if it were uniform.")
