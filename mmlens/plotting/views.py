"""An example image with its related patches outlined and the question's attention over the
patch grid (the views ``mmlens.experiments.views`` saves)."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import plotly.graph_objects as go
from PIL import Image


def example_view_figure(view: Mapping[str, Any]) -> go.Figure:
    """Two panels' worth in one: the image with red outlines on related patches and the
    attention heatmap laid over it."""
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(view["image_png"]))))
    height, width = pixels.shape[:2]
    grid = int(view["grid"])
    attention = np.asarray(view["attention"], dtype=float).reshape(grid, grid)
    step_x, step_y = width / grid, height / grid
    figure = go.Figure(go.Image(z=pixels, name="image"))
    figure.add_trace(go.Heatmap(
        z=attention, x=(np.arange(grid) + 0.5) * step_x, y=(np.arange(grid) + 0.5) * step_y,
        colorscale="Inferno", opacity=0.5, colorbar={"title": "attention"}, name="attention"))
    for index in view["related"]:
        row, col = divmod(int(index), grid)
        figure.add_shape(type="rect", x0=col * step_x, x1=(col + 1) * step_x, y0=row * step_y,
                         y1=(row + 1) * step_y, line={"color": "red", "width": 2})
    figure.update_layout(title=f"{view['task']}: {view['question']} (gold {view['answer']!r}, "
                               f"model {str(view.get('model_answer') or '').strip()!r})",
                         template="simple_white", width=560, height=520)
    figure.update_yaxes(autorange="reversed", scaleanchor="x", showticklabels=False)
    figure.update_xaxes(showticklabels=False)
    return figure


def view_caption(view: Mapping[str, Any]) -> str:
    """How much of the question's attention to the image lands on the related patches."""
    attention = np.asarray(view["attention"], dtype=float)
    related = list(view["related"])
    total = attention.sum()
    if not related or total <= 0:
        return (f"No related patch in this example's base grid; the question's attention is "
                f"spread over {len(attention)} patches.")
    share = attention[related].sum() / total
    return (f"Red outlines: the {len(related)} related patches of {len(attention)}. They draw "
            f"{share:.0%} of the question's attention to the image (mean over layers, heads "
            f"and question tokens), against {len(related) / len(attention):.0%} if it were "
            "uniform.")
