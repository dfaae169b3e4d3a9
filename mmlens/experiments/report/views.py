"""One example per task as the model saw it: the image, the related patches, and where the
question looks.

    views = example_views(model, examples, records, settings)    # list of plain dicts
    (run_dir / "views.json").write_text(json.dumps(views))        # the report draws them

For the first kept example of each task: the image the grid of image tokens covers, as the
vision tower receives it (un-normalised), the question, the gold and the model's answer, the
grid's shape (``rows`` x ``cols``, row-major) and the side in pixels of one of its cells
(``cell_px``), the related cells (indices into the grid), and the attention from the question
positions to each cell's image token, averaged over heads, question positions and layers:

The grid is the view tile (``ImageLayout.view_tile``: tile 0, InternVL's thumbnail) of the
image's token map (``mmlens.inputs.token_map``):

- LLaVA-1.5: the ``grid x grid`` patches of the one image (a CLS feature is left out);
- LLaVA-NeXT / LLaVA-OneVision (anyres): the base tile's ``grid x grid`` patches (the whole
  image squashed to one tile); the high-resolution tiles are not shown;
- Qwen2-VL / Qwen2.5-VL: the ``(grid_h / merge) x (grid_w / merge)`` merged cells of the
  resized image (28x28 px each for the released checkpoints), reassembled from the packed
  ``pixel_values`` by undoing the processor's patch packing and normalisation
  (``mmlens.inputs.qwen_geometry.unpack_patches``);
- InternVL 3: the thumbnail tile (the whole image squashed to one tile) and its ``g/2 x g/2``
  pixel-shuffled tokens (2x2 patches each); the other tiles are not shown.
- Llama-3.2-Vision: the first tile's ``grid x grid`` patches, which are keys of the
  cross-attention layers (the attention is theirs, averaged over those layers).

This is one extra forward per task, with attention patterns on, outside the sweep. With the
sweep's table (``flow=``), each view also holds ``flows`` (``view_flows``: per studied flow,
the example's knockout curve and the study's window centred where it drops most) and
``word_maps``: the causal map over the grid of each question word and of the last position
(``mmlens.methods.word_maps``) in each distinct window of those flows; one clean run and one
batched forward per 64 variants (word x window x grid token). The report's flow control
switches between them.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from PIL import Image
from torch import Tensor


@dataclass(frozen=True)
class ViewGrid:
    """The grid a view draws: its shape, the side of one cell in pixels of ``pixels``, the
    sequence positions of its tokens (row-major) and the image under it, still normalised."""

    rows: int
    cols: int
    cell_px: int
    positions: Int[Tensor, " rows_x_cols"]
    pixels: Float[Tensor, "3 height width"]


def view_grid(model: Any, batch: Any) -> ViewGrid:
    """The grid of example 0 of ``batch``: the tokens of the layout's view tile (tile 0 unless
    it says otherwise: InternVL's thumbnail, Idefics3's global view) of its image's token map
    that have a place in it (``row`` / ``col``; a class token or a newline has none),
    row-major."""
    layout = batch.image_layout if batch.image_layout is not None else (
        model.family.image_layout(model))
    if layout is None or not batch.token_maps:
        raise ValueError(f"no example view for {model.family.name!r}: its family declares no "
                         "image layout (Family.image_layout), or the batch was not built by "
                         "model.prepare")
    token_map = batch.token_maps[0][0]
    rows, cols, shown = token_map.grid_cells(layout.view_tile(token_map))
    image = batch.positions("image", 0)
    if not layout.in_sequence:  # the map's tokens are the image's cross-attention keys
        image = torch.arange(len(token_map), device=image.device)
    if len(image) < len(token_map):
        raise ValueError(f"the example's prompt holds {len(image)} image tokens but its image "
                         f"map {len(token_map)}: was the batch prepared with this model's "
                         "processor?")
    return ViewGrid(rows, cols, layout.cell_px, image[torch.tensor(shown)],
                    layout.view_pixels(batch, 0))


def _image_png(model: Any, pixels: Float[Tensor, "3 height width"]) -> str:
    """The normalised image the vision tower sees, un-normalised, as a base64 PNG."""
    image_processor = model.processor.image_processor
    normalised = getattr(image_processor, "do_normalize", True)
    mean = getattr(image_processor, "image_mean", None) if normalised else None
    std = getattr(image_processor, "image_std", None) if normalised else None
    mean = torch.tensor(mean or [0.0] * 3)[:, None, None]
    std = torch.tensor(std or [1.0] * 3)[:, None, None]
    values = pixels.float().cpu() * std + mean
    array = (values.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _example_rows(flow: pd.DataFrame, name: str, example_id: str) -> pd.Series:
    """The example's value per centre layer for flow ``name`` (NaN rows left out)."""
    value = "change" if "change" in flow.columns else "rel_change"
    rows = flow[(flow["flow"] == name) & (flow["example_id"].astype(str) == str(example_id))]
    return rows.dropna(subset=[value]).groupby("layer")[value].mean()


def map_window(flow: pd.DataFrame, name: str, example_id: str, n_layers: int) -> list[int]:
    """The study's window (``flow.attrs["window"]`` layers) centred at the layer where ``name``
    lowers the answer of example ``example_id`` most: the example's own rows, so a run split
    into shards and merged gets the same window. The middle layer when the example has no
    value for that flow (absent, or undefined as a logit difference without a wrong
    answer)."""
    from mmlens.methods.windows import window_layers

    centre = _deepest(_example_rows(flow, name, example_id), n_layers)
    return window_layers(centre, int(flow.attrs.get("window") or 1), n_layers)


def _deepest(curve: pd.Series, n_layers: int) -> int:
    """The centre layer of the curve's deepest drop; the middle layer for an empty curve."""
    return int(curve.idxmin()) if not curve.empty else n_layers // 2


def view_flows(flow: pd.DataFrame, example_id: str, n_layers: int) -> list[dict[str, Any]]:
    """Each studied flow (controls left out) of the example: ``name``, ``layers`` (its window,
    ``map_window``, centred at ``centre``), ``centres`` and ``values`` (the example's knockout
    curve from the sweep's table), ``window`` (index of its window among the distinct ones, in
    order)."""
    from mmlens.experiments.controls import is_control

    flows, windows = [], []
    for name in dict.fromkeys(flow["flow"]):
        if is_control(name):
            continue
        layers = map_window(flow, name, example_id, n_layers)
        if layers not in windows:
            windows.append(layers)
        curve = _example_rows(flow, name, example_id)
        flows.append({"name": name, "layers": layers, "window": windows.index(layers),
                      "centre": _deepest(curve, n_layers),
                      "centres": [int(c) for c in curve.index],
                      "values": [round(float(v), 6) for v in curve]})
    return flows


def _word_maps(model: Any, batch: Any, grid: ViewGrid,
               flows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The causal map over the view's grid of each question word, then of the last position,
    in each distinct window of ``flows`` (window after window, the words in the same order),
    all from one clean run (``window_word_maps``)."""
    from mmlens.methods.word_maps import window_word_maps

    windows = [list(layers) for layers in dict.fromkeys(tuple(e["layers"]) for e in flows)]
    maps = []
    per_window = window_word_maps(model, batch, windows, grid=grid.positions,
                                  spans=("question", "last"))
    for index, (layers, entries) in enumerate(zip(windows, per_window, strict=True)):
        maps += [{**entry, "layers": layers, "window": index} for entry in entries]
        maps[-1]["word"] = "last position"
    return maps


@torch.no_grad()
def example_view(model: Any, record: Any, prepare_options: Mapping[str, Any],
                 model_answer: str | None, flow: pd.DataFrame | None = None,
                 word_maps: bool = True) -> dict[str, Any]:
    """The view of one dataset ``Example`` (see the module docstring); ``word_maps=False``
    leaves the words' causal maps out (``word_maps_skipped``), not the flows' curves."""
    from mmlens.inputs.prepare import prepare

    image = record.load_image()
    batch = prepare(model, [image], [record.question], boxes=[record.boxes_for(image.size)],
                    **prepare_options)
    batch = batch.to(model.embed.W_E.device)
    grid = view_grid(model, batch)
    cells = grid.positions
    question = batch.positions("question", 0)
    total = torch.zeros(len(cells), dtype=torch.float32, device=cells.device)

    def keep(pattern: torch.Tensor, hook) -> None:
        total.add_(pattern[0][:, question][:, :, cells].float().mean((0, 1)))

    cross = model.cfg.text.cross_attention_layers  # there the cells are keys of these layers
    names = ([f"blocks.{layer}.cross_attn.hook_pattern" for layer in cross] if cross else
             [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)])
    with model.hooks(fwd_hooks=[(name, keep) for name in names]):
        model(batch.input_ids, batch.pixel_values, attention_mask=batch.attention_mask,
              image_sizes=batch.image_sizes, stop_at_layer=model.cfg.n_layers)
    related = torch.isin(cells, batch.positions("related", 0)).nonzero().flatten()
    maps: dict[str, Any] = {}
    if flow is not None:
        flows = view_flows(flow, str(record.example_id), model.cfg.n_layers)
        maps = ({"word_maps": _word_maps(model, batch, grid, flows)} if word_maps
                else {"word_maps_skipped": True})
        maps.update(flows=flows, flow_value="change" if "change" in flow.columns
                    else "rel_change")
    return {"example_id": str(record.example_id), "task": str(record.task),
            "question": record.question, "answer": str(record.answer),
            "model_answer": model_answer, "rows": grid.rows, "cols": grid.cols,
            "cell_px": grid.cell_px, "image_png": _image_png(model, grid.pixels),
            "related": related.tolist(),
            "attention": (total / len(names)).cpu().tolist(), **maps}


def example_views(model: Any, examples: Sequence[Any], records: Sequence[Mapping[str, Any]],
                  prepare_options: Mapping[str, Any],
                  flow: pd.DataFrame | None = None,
                  word_maps: bool = True) -> list[dict[str, Any]]:
    """The first kept example of each task, in task order; with the sweep's table ``flow``,
    each with its flows' curves and (``word_maps``) its words' causal maps."""
    by_id = {str(e.example_id): e for e in examples}
    views, seen = [], set()
    for record in records:
        if record.get("dropped") or record["task"] in seen or record["example_id"] not in by_id:
            continue
        seen.add(record["task"])
        views.append(example_view(model, by_id[record["example_id"]], prepare_options,
                                  record.get("model_answer"), flow, word_maps))
    return sorted(views, key=lambda view: view["task"])
