"""Attention between spans: a tidy table of attention mass, a layer x head heatmap, and
attention from one position laid over the image's patch grid."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from mmlens.inputs.batch import MultimodalBatch
from mmlens.methods.knockout import PositionSpec, resolve_positions


def attention_mass(
    cache: Any, batch: MultimodalBatch, src: PositionSpec, dst: PositionSpec, *,
    layers: list[int] | None = None,
) -> pd.DataFrame:
    """How much attention ``dst`` positions pay to ``src`` positions, per layer and head.

    ``mass`` is the attention summed over the src keys and averaged over the dst queries (1 =
    every dst position attends only to src). Reads ``blocks.{l}.attn.hook_pattern`` from a
    ``run_with_cache`` cache. Columns: ``example, layer, head, src, dst, mass``.
    """
    if layers is None:
        layers = sorted(int(name.split(".")[1]) for name in cache.keys()
                        if name.startswith("blocks.") and name.endswith("attn.hook_pattern"))
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in layers]
    missing = [name for name in names if name not in cache]
    if missing or not names:
        raise KeyError(f"the cache has no {missing[0] if missing else 'attention pattern'}: run "
                       "model.run_with_cache(batch) (or names_filter with 'hook_pattern')")
    sources, targets = (_per_example(resolve_positions(spec, batch, role=role), len(batch))
                        for spec, role in ((src, "src"), (dst, "dst")))
    rows = []
    for layer, name in zip(layers, names, strict=True):
        pattern = cache[name]  # [batch, head, q_pos, k_pos]
        for i in range(len(batch)):
            block = pattern[i][:, targets[i][:, None], sources[i][None, :]]
            for head, mass in enumerate(block.sum(-1).mean(-1).tolist()):
                rows.append((i, layer, head, mass))
    frame = pd.DataFrame(rows, columns=["example", "layer", "head", "mass"])
    frame.insert(3, "src", _label(src))
    frame.insert(4, "dst", _label(dst))
    return frame


def attention_mass_heatmap(frame: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Layer x head heatmap of ``attention_mass`` (mean over examples)."""
    table = frame.pivot_table(index="layer", columns="head", values="mass", aggfunc="mean")
    figure = go.Figure(go.Heatmap(z=table.to_numpy(), x=list(table.columns), y=list(table.index),
                                  colorscale="Blues", colorbar={"title": "mass"}))
    flow = f"{frame['src'].iloc[0]} → {frame['dst'].iloc[0]}"
    figure.update_layout(title=title or f"attention mass {flow}", xaxis_title="head",
                         yaxis_title="layer")
    return figure


def image_attention(
    cache: Any, batch: MultimodalBatch, grid_size: int | None = None, *, layer: int,
    example: int = 0,
    query: PositionSpec = "last", head: int | None = None, image: Any = None,
    opacity: float = 0.6,
) -> go.Figure:
    """Attention from ``query`` to the image patches as a heatmap over the patch grid.

    The grid is tile 0 of the example's first image map (``batch.token_maps``, from
    ``model.prepare``): LLaVA-1.5's patches, the base tile of LLaVA-NeXT / OneVision, Qwen-VL's
    merged cells; Llama-3.2-Vision's tile patches, read from ``blocks.{layer}.cross_attn`` (a
    cross-attention layer). For a batch without maps give ``grid_size``: the first
    ``grid_size**2`` image positions (after CLS when the features keep it) are then read as a
    square patch grid.
    ``head=None`` averages the heads; several query positions are averaged. With ``image`` (a
    PIL image or ``[H, W, 3]`` array, ideally the model's resized view) the heatmap is laid over
    it with ``opacity``.
    """
    cross = batch.image_layout is not None and not batch.image_layout.in_sequence
    name = f"blocks.{layer}.{'cross_attn' if cross else 'attn'}.hook_pattern"
    if cross and name not in cache:
        raise KeyError(f"layer {layer} is not a cross-attention layer: this model's image is "
                       "not in the prompt, so only its cross-attention layers attend to it "
                       "(layer= one of the cache's blocks.{l}.cross_attn.hook_pattern)")
    if name not in cache:
        raise KeyError(f"the cache has no {name}: run model.run_with_cache(batch)")
    queries = _per_example(resolve_positions(query, batch, role="query"), len(batch))[example]
    image_positions = batch.positions("image", example)
    if cross:  # the image-token map's tokens are the cross-attention keys
        image_positions = torch.arange(len(batch.token_maps[example][0]))
    if batch.token_maps:
        rows, cols, cells = batch.token_maps[example][0].grid_cells(0)
        image_positions = image_positions[torch.tensor(cells)]
    elif grid_size is None:
        raise ValueError("the batch has no image maps (it was not built by model.prepare): "
                         "pass grid_size=model.cfg.vision.grid_size")
    else:
        rows = cols = grid_size
        if len(image_positions) < rows * cols:
            raise ValueError(f"example {example} has {len(image_positions)} image positions but "
                             f"a {grid_size}x{grid_size} grid needs {rows * cols}: pass "
                             "model.cfg.vision.grid_size")
        if len(image_positions) == rows * cols + 1:
            image_positions = image_positions[1:]  # the "full" feature strategy keeps CLS first
    pattern = cache[name][example]  # [head, q_pos, k_pos]
    pattern = pattern.mean(0) if head is None else pattern[head]
    weights = pattern[queries][:, image_positions[:rows * cols]].float().mean(0)
    grid = weights.reshape(rows, cols).detach().cpu().numpy()
    figure = go.Figure()
    height, width = rows, cols
    if image is not None:
        pixels = np.asarray(image)[..., :3]
        height, width = pixels.shape[:2]
        figure.add_trace(go.Image(z=pixels, name="image"))
    centres_x = (np.arange(cols) + 0.5) * width / cols
    centres_y = (np.arange(rows) + 0.5) * height / rows
    figure.add_trace(go.Heatmap(z=grid, x=centres_x, y=centres_y, colorscale="Inferno",
                                opacity=opacity if image is not None else 1.0,
                                colorbar={"title": "attention"}, name="attention"))
    heads = "mean over heads" if head is None else f"head {head}"
    figure.update_layout(title=f"attention from {_label(query)} to the image, layer {layer}, "
                               f"{heads}")
    figure.update_yaxes(autorange="reversed", scaleanchor="x", showticklabels=False)
    figure.update_xaxes(showticklabels=False)
    return figure


def _per_example(positions: torch.Tensor | list[torch.Tensor], n: int) -> list[torch.Tensor]:
    return positions if isinstance(positions, list) else [positions] * n


def _label(spec: PositionSpec) -> str:
    return spec if isinstance(spec, str) else "positions"
