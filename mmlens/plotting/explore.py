"""A notebook explorer of causal image maps: pick an example and a word, slide the layer window,
and the map over the image follows.

    explore(model, batch, words=["square", "red"], centres=[1, 3, 5]).show()

One plain plotly figure, every map precomputed (``mmlens.methods.word_maps.word_frames``: one
clean run and one batched forward per word and window), so it needs no widget package and
works in a saved notebook or an HTML file. Trace 0 is the example's image, trace 1 the map (a
heatmap at the image tokens' pixel places, one grid: the one holding most of the tokens).
The dropdown (``layout.updatemenus[0]``) holds one button per example and word: it redraws the
image and the map and swaps in that choice's slider (``layout.sliders[0]``), whose steps are
the layer windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from mmlens.core.errors import MMLensError
from mmlens.methods.windows import default_window, window_layers
from mmlens.methods.word_maps import word_frames


def map_grid(frame: pd.DataFrame) -> dict[str, list]:
    """A causal-map frame of one example as heatmap arguments: ``z`` (rows x cols of its
    values), ``x`` / ``y`` (the pixel centres of its columns and rows); the grid (``tile``)
    holding most of its regions."""
    tile = int(frame["tile"].value_counts().idxmax())
    rows = frame[frame["tile"] == tile]
    z = rows.pivot_table(index="row", columns="col", values="value", aggfunc="first")
    x = ((rows["x0"] + rows["x1"]) / 2).groupby(rows["col"]).mean().loc[z.columns]
    y = ((rows["y0"] + rows["y1"]) / 2).groupby(rows["row"]).mean().loc[z.index]
    return {"z": z.to_numpy().tolist(), "x": x.tolist(), "y": y.tolist()}


def explore(model: Any, batch: Any, *, words: Sequence[str] | None = None,
            centres: Sequence[int] | None = None, window: int | None = None,
            span: str = "question", examples: Sequence[int] | None = None,
            images: Sequence[Any] | None = None, batch_size: int = 64) -> go.Figure:
    """The explorer of ``batch``'s examples (see the module docstring).

    ``words``: the words of ``span`` to offer (default all), plus ``"last position"``, the
    answer's. ``centres``: the window centres the slider steps through (default four spread
    over the depth); ``window``: layers per window (default the study's,
    ``default_window``). ``images``: each example's original image (default the batch's
    records'). Cost: one ``causal_map`` per example, word and centre.
    """
    n_layers = model.cfg.n_layers
    window = default_window(n_layers) if window is None else window
    centres = (sorted({int(c) for c in np.linspace(0, n_layers - 1, min(4, n_layers)).round()})
               if centres is None else list(centres))
    windows = [window_layers(centre, window, n_layers) for centre in centres]
    choices = []
    for example in range(len(batch)) if examples is None else examples:
        image = _image(batch, images, example)
        per_window = [word_frames(model, batch, layers, span=span, example=example,
                                  words=words, image_size=image, batch_size=batch_size)
                      + word_frames(model, batch, layers, span="last", example=example,
                                    image_size=image, batch_size=batch_size)
                      for layers in windows]
        last = len(per_window[0]) - 1
        choices += [(example, "last position" if index == last else per_window[0][index][0],
                     [map_grid(found[index][2]) for found in per_window],
                     np.asarray(image)[..., :3]) for index in range(last + 1)]
    if words is not None and all(word == "last position" for _, word, _, _ in choices):
        raise MMLensError(f"none of the words {list(words or [])} is in the examples' {span!r} "
                          "span: give words of the question (span_words lists them)")
    return _figure(choices, windows)


def _image(batch: Any, images: Sequence[Any] | None, example: int) -> Any:
    if images is not None:
        return images[example]
    if not batch.examples:
        raise MMLensError("the batch carries no example records: pass images= (the images "
                          "given to model.prepare)")
    return batch.examples[example].load_image()


def _figure(choices: list, windows: list[list[int]]) -> go.Figure:
    example, word, grids, pixels = choices[0]
    bound = max(float(np.nanmax(np.abs(np.asarray(g["z"], dtype=float)))) for _, _, gs, _ in
                choices for g in gs) or 1.0
    figure = go.Figure([go.Image(z=pixels, hoverinfo="skip", name="image"),
                        go.Heatmap(**grids[0], colorscale="RdBu", zmin=-bound, zmax=bound,
                                   opacity=0.6, name="causal map",
                                   colorbar={"title": "relative change"})])
    buttons = [{"label": f"example {e}: {w}", "method": "update",
                "args": [{"z": [p, gs[0]["z"]], "x": [None, gs[0]["x"]],
                          "y": [None, gs[0]["y"]]},
                         {"sliders": [_slider(e, w, gs, windows)],
                          "title": _title(e, w, windows[0])},
                         [0, 1]]}
               for e, w, gs, p in choices]
    figure.update_layout(
        updatemenus=[{"buttons": buttons, "direction": "down", "x": 0, "y": 1.12,
                      "xanchor": "left", "showactive": True}],
        sliders=[_slider(example, word, grids, windows)], title=_title(example, word, windows[0]),
        width=620, height=640, margin={"t": 110})
    figure.update_yaxes(autorange="reversed", scaleanchor="x", showticklabels=False)
    figure.update_xaxes(showticklabels=False)
    return figure


def _slider(example: int, word: str, grids: list[dict[str, list]],
            windows: list[list[int]]) -> dict[str, Any]:
    steps = [{"label": f"{layers[0]}-{layers[-1]}", "method": "update",
              "args": [{"z": [grid["z"]]}, {"title": _title(example, word, layers)}, [1]]}
             for grid, layers in zip(grids, windows, strict=True)]
    return {"steps": steps, "active": 0, "currentvalue": {"prefix": "layers "}, "y": -0.02}


def _title(example: int, word: str, layers: list[int]) -> str:
    return (f"example {example}: blocking {word!r} from one image token at a time, "
            f"layers {layers[0]}-{layers[-1]}")
