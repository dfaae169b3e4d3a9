"""A causal image map drawn over its image, beside the raw attention to the same regions; an
SAE feature's activations over the image drawn the same way (``feature_map_figure``).

    frame = causal_map(model, batch, dst="last", layers=layers)
    _, cache = model.run_with_cache(batch, names_filter=lambda n: n.endswith("hook_pattern"))
    causal_map_figure(frame, image, cache=cache).show()

Each region is a rectangle at its pixel box in the original image, coloured by its value
(the relative change of the target's probability when the region is knocked out or patched);
the right panel colours the same rectangles by the attention ``dst`` pays them
(``region_attention``: ``blocks.{l}.attn.hook_pattern`` averaged over the map's layers, the
heads and the ``dst`` positions, summed over the region's tokens).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots


def region_attention(cache: Any, frame: pd.DataFrame) -> pd.Series:
    """Per row of a ``causal_map`` frame, the attention its ``dst`` pays the region's tokens:
    summed over the tokens, averaged over the frame's layers, the heads and the dst positions.

    Rows must come from the batch ``cache`` was run on (positions index its padded prompts).
    """
    layers, targets = frame.attrs.get("layers"), frame.attrs.get("dst_positions")
    if layers is None or targets is None:
        raise ValueError("the frame does not record its layers and dst positions: pass the "
                         "frame causal_map returned (frame.attrs)")
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in layers]
    missing = [name for name in names if name not in cache]
    if missing:
        raise KeyError(f"the cache has no {missing[0]}: run model.run_with_cache(batch) on the "
                       "batch the map was made from (names_filter keeping 'hook_pattern')")
    # [example, k_pos]: attention from the dst positions, mean over layers, heads, queries
    mean = sum(cache[name].float().mean(1) for name in names) / len(names)
    per_example = [mean[i][targets[i]].mean(0) for i in range(len(targets))]
    values = [float(per_example[int(example)][list(positions)].sum())
              for example, positions in zip(frame["example"], frame["position"], strict=True)]
    return pd.Series(values, index=frame.index, name="attention")


def causal_map_figure(frame: pd.DataFrame, image: Any, *, example: int = 0, tile: int | None = None,
                      cache: Any = None, colorscale: str = "RdBu",
                      opacity: float = 0.55) -> go.Figure:
    """The map of ``example`` over ``image`` (the original image given to ``prepare``: a PIL
    image or ``[H, W, 3]`` array), and beside it the raw attention when ``cache`` is given.

    ``tile``: which grid to draw where regions come from several (LLaVA-NeXT's base tile 0 and
    high-resolution grid 1); default: the grid holding most of the example's regions.
    """
    rows = _rows(frame, "value", "causal_map", example, tile)
    pixels = np.asarray(image)[..., :3]
    panels = [("value", rows["value"])]
    if cache is not None:
        panels.append(("attention", region_attention(cache, frame).loc[rows.index]))
    titles = [_caption(rows, frame.attrs)]
    if cache is not None:
        titles.append(_attention_caption(rows, panels[1][1], frame.attrs))
    figure = make_subplots(rows=1, cols=len(panels), subplot_titles=titles,
                           horizontal_spacing=0.12)
    for column, (name, values) in enumerate(panels, start=1):
        figure.add_trace(go.Image(z=pixels, hoverinfo="skip"), row=1, col=column)
        _draw_regions(figure, rows, values, name, column, len(panels), colorscale, opacity)
        figure.update_xaxes(showticklabels=False, range=[0, pixels.shape[1]], row=1, col=column)
        figure.update_yaxes(showticklabels=False, range=[pixels.shape[0], 0], scaleanchor=(
            "x" if column == 1 else f"x{column}"), row=1, col=column)
    figure.update_layout(width=460 * len(panels), height=480, showlegend=False)
    return figure


def feature_map_figure(frame: pd.DataFrame, image: Any, *, feature: int | None = None,
                       example: int = 0, tile: int | None = None,
                       opacity: float = 0.55) -> go.Figure:
    """One SAE feature's activation at each image token of ``example``, over ``image``
    (``mmlens.methods.sae_features.image_features``'s frame; ``feature`` default: the
    example's first)."""
    rows = _rows(frame, "activation", "image_features", example, tile)
    feature = int(rows["feature"].iloc[0]) if feature is None else feature
    rows = rows[rows["feature"] == feature]
    if rows.empty:
        raise ValueError(f"the frame has no rows for feature {feature} of example {example}: "
                         f"it holds features {sorted(set(frame['feature']))}")
    pixels = np.asarray(image)[..., :3]
    top = rows.loc[rows["activation"].idxmax()]
    hook = frame.attrs.get("hook_name", "the SAE's hook")
    figure = make_subplots(rows=1, cols=1, subplot_titles=[
        f"feature {feature} at {hook}: strongest {top['activation']:.3g} at {top['region']}, "
        f"active on {int((rows['activation'] > 0).sum())} of {len(rows)} tokens"])
    figure.add_trace(go.Image(z=pixels, hoverinfo="skip"), row=1, col=1)
    _draw_regions(figure, rows, rows["activation"], "activation", 1, 1, "Inferno", opacity)
    figure.update_xaxes(showticklabels=False, range=[0, pixels.shape[1]])
    figure.update_yaxes(showticklabels=False, range=[pixels.shape[0], 0], scaleanchor="x")
    figure.update_layout(width=520, height=500, showlegend=False)
    return figure


def _rows(frame: pd.DataFrame, value: str, maker: str, example: int,
          tile: int | None) -> pd.DataFrame:
    """The rows one figure draws: one example, one grid (default: the grid holding most of
    them); refuses frames without a map's columns."""
    missing = {"example", "region", "tile", "x0", "y0", "x1", "y1", value} - set(frame.columns)
    if missing:
        raise ValueError(f"the figure needs a frame from {maker}; missing columns "
                         f"{', '.join(sorted(missing))}")
    rows = frame[frame["example"] == example]
    if rows.empty:
        raise ValueError(f"the frame has no rows for example {example}: it holds examples "
                         f"{sorted(set(frame['example']))}")
    if tile is None:
        tile = int(rows["tile"].value_counts().idxmax())
    return rows[rows["tile"] == tile]


def _draw_regions(figure: go.Figure, rows: pd.DataFrame, values: pd.Series, name: str,
                  column: int, n_panels: int, colorscale: str, opacity: float) -> None:
    """Filled rectangles at the regions' pixel boxes; a marker trace carries the colour bar
    and the hover text."""
    array = values.to_numpy(dtype=float)
    if name == "value":
        bound = float(np.nanmax(np.abs(array))) or 1.0
        low, high, scale = -bound, bound, colorscale
    else:  # attention, feature activations: non-negative
        low, high, scale = 0.0, float(np.nanmax(array)) or 1.0, "Inferno"
    colours = sample_colorscale(scale, list(np.clip((array - low) / (high - low), 0, 1)))
    for (_, row), colour in zip(rows.iterrows(), colours, strict=True):
        figure.add_shape(type="rect", x0=row.x0, y0=row.y0, x1=row.x1, y1=row.y1,
                         fillcolor=colour, opacity=opacity, line={"width": 0},
                         row=1, col=column)
    label = "relative change" if name == "value" else name
    figure.add_trace(go.Scatter(
        x=(rows["x0"] + rows["x1"]) / 2, y=(rows["y0"] + rows["y1"]) / 2, mode="markers",
        marker={"size": 1, "opacity": 0, "color": array, "colorscale": scale, "cmin": low,
                "cmax": high, "showscale": True,
                "colorbar": {"title": label, "len": 0.8, "x": column / n_panels - 0.02}},
        text=[f"{r.region}: {label} {v:+.3g}" for (_, r), v in zip(rows.iterrows(), array,
                                                                    strict=True)],
        hoverinfo="text"), row=1, col=column)


def _what(attrs: dict) -> str:
    layers = attrs.get("layers") or []
    window = f"layers {layers[0]}-{layers[-1]}" if layers else "all layers"
    return f"{attrs.get('dst', 'dst')}, {window}"


def _caption(rows: pd.DataFrame, attrs: dict) -> str:
    strongest = rows.loc[rows["value"].idxmin()]
    verb = "patching" if attrs.get("mode") == "patch" else "blocking"
    return (f"{verb} each region → {_what(attrs)}: largest drop {strongest['value']:+.1%} "
            f"at {strongest['region']}")


def _attention_caption(rows: pd.DataFrame, attention: pd.Series, attrs: dict) -> str:
    top = attention.idxmax()
    return (f"attention from {_what(attrs)}: most {float(attention[top]):.3f} at "
            f"{rows.loc[top, 'region']}")
