"""A notebook explorer of causal image maps: pick an example and a word (and a flow), slide the
layer window, and the map over the image (and the flow's curve) follows.

    explore(model, batch, words=["square", "red"], centres=[1, 3, 5]).show()
    explore(model, batch, flows=["image->question", "image->last"]).show()

One plain plotly figure, every map precomputed (``mmlens.methods.word_maps.word_frames``: one
clean run and one batched forward per word and window), so it needs no widget package and
works in a saved notebook or an HTML file. Trace 0 is the example's image, trace 1 the map (a
heatmap at the image tokens' pixel places, one grid: the one holding most of the tokens).
The dropdown (``layout.updatemenus[0]``) holds one button per example and word: it redraws the
image and the map and swaps in that choice's slider (``layout.sliders[0]``), whose steps are
the layer windows.

With ``flows``, the figure has a second panel: the picked example's knockout curve for the
picked flow across windows (``mmlens.methods.flow_curve``: the numbers the study's sweep gives
that example), trace 2, with the window the map blocks marked on it (trace 3). One button per
example, word and flow; the flow sets the slider's first position to its deepest drop for
that example (its steps: ``centres`` plus each flow's deepest centre), and each step moves the
mark.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from mmlens.core.errors import MMLensError
from mmlens.methods.flow_curve import flow_curve
from mmlens.methods.windows import check_window, window_layers
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
            images: Sequence[Any] | None = None, flows: Sequence[str] | None = None,
            batch_size: int = 64) -> go.Figure:
    """The explorer of ``batch``'s examples (see the module docstring).

    ``words``: the words of ``span`` to offer (default all), plus ``"last position"``, the
    answer's. ``centres``: the window centres the slider steps through (default four spread
    over the depth); ``window``: layers per window (default the study's,
    ``default_window``). ``images``: each example's original image (default the batch's
    records'). ``flows``: ``"SRC->DST"`` span names; adds each flow's curve and its deepest
    window (see the module docstring). Cost: one ``causal_map`` per example, word and centre,
    and one ``flow_curve`` per example and flow.
    """
    n_layers = model.cfg.n_layers
    window = check_window(window, n_layers)
    centres = (sorted({int(c) for c in np.linspace(0, n_layers - 1, min(4, n_layers)).round()})
               if centres is None else list(centres))
    windows = [window_layers(centre, window, n_layers) for centre in centres]
    if flows is not None:
        return _flow_figure(_flow_choices(model, batch, list(flows), centres, window, words,
                                          span, examples, images, batch_size), n_layers)
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


def _flow_choices(model: Any, batch: Any, flows: list[str], centres: list[int], window: int,
                  words: Sequence[str] | None, span: str, examples: Sequence[int] | None,
                  images: Sequence[Any] | None, batch_size: int) -> list[dict[str, Any]]:
    """One entry per example, word and flow: its curve, its slider's centres and maps (one
    per centre, shared by the flows) and the step its flow starts at."""
    if not flows:
        raise MMLensError("flows is empty: give flows as 'SRC->DST' span names, or leave "
                          "flows out for the maps alone")
    n_layers = model.cfg.n_layers
    choices = []
    for example in range(len(batch)) if examples is None else examples:
        image = _image(batch, images, example)
        curves = {flow: flow_curve(model, batch, flow, window=window, example=example,
                                   batch_size=batch_size) for flow in flows}
        deepest = {flow: _deepest(curve, n_layers) for flow, curve in curves.items()}
        steps = sorted(set(centres) | set(deepest.values()))
        per_step = [word_frames(model, batch, window_layers(c, window, n_layers), span=span,
                                example=example, words=words, image_size=image,
                                batch_size=batch_size)
                    + word_frames(model, batch, window_layers(c, window, n_layers),
                                  span="last", example=example, image_size=image,
                                  batch_size=batch_size) for c in steps]
        last = len(per_step[0]) - 1
        if words is not None and last == 0:
            raise MMLensError(f"none of the words {list(words)} is in the examples' {span!r} "
                              "span: give words of the question (span_words lists them)")
        for index in range(last + 1):
            word = "last position" if index == last else per_step[0][index][0]
            for flow, curve in curves.items():
                choices.append({
                    "example": example, "word": word, "flow": flow,
                    "pixels": np.asarray(image)[..., :3], "centres": steps,
                    "grids": [map_grid(found[index][2]) for found in per_step],
                    "windows": [window_layers(c, window, n_layers) for c in steps],
                    "curve": curve, "start": steps.index(deepest[flow])})
    return choices


def _deepest(curve: pd.DataFrame, n_layers: int) -> int:
    """The centre of the curve's deepest drop; the middle layer when it has no value."""
    values = curve.set_index("layer")["rel_change"].dropna()
    return int(values.idxmin()) if not values.empty else n_layers // 2


def _flow_figure(choices: list[dict[str, Any]], n_layers: int) -> go.Figure:
    from plotly.subplots import make_subplots

    first = choices[0]
    bound = max(float(np.nanmax(np.abs(np.asarray(g["z"], dtype=float))))
                for choice in choices for g in choice["grids"]) or 1.0
    figure = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45],
                           horizontal_spacing=0.12)
    figure.add_trace(go.Image(z=first["pixels"], hoverinfo="skip", name="image"), 1, 1)
    grid = first["grids"][first["start"]]
    figure.add_trace(go.Heatmap(**grid, colorscale="RdBu", zmin=-bound, zmax=bound,
                                opacity=0.6, name="causal map",
                                colorbar={"title": "relative change", "x": 0.46}), 1, 1)
    curve = first["curve"]
    figure.add_trace(go.Scatter(x=curve["layer"], y=curve["rel_change"], mode="lines+markers",
                                name=first["flow"]), 1, 2)
    figure.add_trace(go.Scatter(**_mark(first, first["start"]), mode="markers",
                                name="the map's window",
                                marker={"size": 14, "symbol": "circle-open",
                                        "line": {"width": 3}}), 1, 2)
    buttons = [{"label": f"example {c['example']}: {c['word']} | {c['flow']}",
                "method": "update",
                "args": [{"z": [c["pixels"], c["grids"][c["start"]]["z"], None, None],
                          "x": [None, c["grids"][c["start"]]["x"],
                                c["curve"]["layer"].tolist(), _mark(c, c["start"])["x"]],
                          "y": [None, c["grids"][c["start"]]["y"],
                                c["curve"]["rel_change"].tolist(), _mark(c, c["start"])["y"]],
                          "name": ["image", "causal map", c["flow"], "the map's window"]},
                         {"sliders": [_flow_slider(c)],
                          "title": _flow_title(c, c["windows"][c["start"]])},
                         [0, 1, 2, 3]]}
               for c in choices]
    figure.update_layout(
        updatemenus=[{"buttons": buttons, "direction": "down", "x": 0, "y": 1.14,
                      "xanchor": "left", "showactive": True}],
        sliders=[_flow_slider(first)], title=_flow_title(first, first["windows"][first["start"]]),
        width=1100, height=620, margin={"t": 120}, showlegend=False)
    figure.update_yaxes(autorange="reversed", scaleanchor="x", showticklabels=False, row=1,
                        col=1)
    figure.update_xaxes(showticklabels=False, row=1, col=1)
    figure.update_xaxes(title="centre layer of the blocked window", range=[-0.5, n_layers - 0.5],
                        row=1, col=2)
    figure.update_yaxes(title="relative change of the answer (%)", row=1, col=2)
    return figure


def _mark(choice: dict[str, Any], step: int) -> dict[str, list]:
    """The curve's point at step ``step``'s centre (the window the map blocks)."""
    centre = choice["centres"][step]
    values = choice["curve"].set_index("layer")["rel_change"]
    return {"x": [centre], "y": [float(values.loc[centre])]}


def _flow_slider(choice: dict[str, Any]) -> dict[str, Any]:
    steps = [{"label": f"{layers[0]}-{layers[-1]}", "method": "update",
              "args": [{"z": [grid["z"], None], "x": [grid["x"], _mark(choice, step)["x"]],
                        "y": [grid["y"], _mark(choice, step)["y"]]},
                       {"title": _flow_title(choice, layers)}, [1, 3]]}
             for step, (grid, layers) in enumerate(zip(choice["grids"], choice["windows"],
                                                       strict=True))]
    return {"steps": steps, "active": choice["start"], "currentvalue": {"prefix": "layers "},
            "y": -0.02, "len": 0.55}


def _flow_title(choice: dict[str, Any], layers: list[int]) -> str:
    return (_title(choice["example"], choice["word"], layers)
            + f"<br>beside: this example's {choice['flow']} curve, the map's window marked")
