"""Causal image maps: where in the image the model took what a text group needed, by knocking
out (or patching) one image region at a time.

    frame = causal_map(model, batch, dst="last", layers=window_layers(3, 3, 8))
    frame = causal_map(model, batch, dst="question", cell=2, target="red")
    frame = causal_map(model, batch, regions=["related", "other"])
    frame = causal_map(model, batch, mode="patch", corrupted=corrupt_image(batch))

One row per example and region: ``example, region, position`` (the region's image-token
positions), ``tile, row, col`` (its top-left token on its grid, ``image_regions``), ``x0, y0,
x1, y1`` (its pixel box in the original image), ``p_base``, ``p_block`` and ``value = (p_block
- p_base) / p_base``, the relative change of the target's probability at the last position.
``frame.attrs`` records ``dst``, ``mode``, ``layers`` and ``dst_positions`` (per example).

Exact and batched, as the study's engine (``mmlens.experiments.engine``): a region's knockout
changes nothing before the first ``dst`` position nor below the window's first layer ``a``,
so each example runs once (``clean_run``) and the regions' variants resume together, one row
each, from ``resid[a][:, p:]`` with the clean keys/values of positions ``< p``: the same
numbers as one full forward per region (``block_attention`` + ``run_with_hooks``). A patch
replaces the region's residual stream entering layer ``a`` (``a = 0``: the embeddings) with
the corrupted run's and resumes from the first image position.

Where the image reaches the text only by cross-attention (Llama-3.2-Vision), a region is a set
of the image's cross-attention keys (patches of tiles, ``position`` holds key indices): the
regions' variants run as rows of full forwards, each row's ``dst`` blocked from its keys in the
window's cross-attention layers (a run cannot resume past them). There ``mode="patch"``
replaces what the window's cross-attention layers read for the region's keys (every text
position reads them) with the corrupted image's: those keys' keys and values (``hook_k`` /
``hook_v``, linear in the keys' vision features, the per-key norm after), the rest of the run
clean; the corrupted image must give as many keys (tiles alike).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mmlens.core.errors import MMLensError
from mmlens.inputs.batch import MultimodalBatch
from mmlens.methods.clean_run import CleanRun, clean_run, last_logits, single_example
from mmlens.methods.cross_knockout import cross_key_hooks
from mmlens.methods.edges import blocked_edges, check_attendable
from mmlens.methods.image_regions import (
    Region,
    grid_regions,
    image_token_cells,
    original_size,
    span_regions,
)
from mmlens.methods.knockout import PositionSpec, _check_layers, resolve_positions
from mmlens.model.protocol import HookedModel

MODES = ("knockout", "patch")
COLUMNS = ["example", "region", "position", "tile", "row", "col", "x0", "y0", "x1", "y1",
           "p_base", "p_block", "value"]


@torch.no_grad()
def causal_map(
    model: HookedModel, batch: MultimodalBatch, dst: PositionSpec = "last", *,
    layers: int | Sequence[int] | None = None, target: int | str | Sequence[int] | None = None,
    cell: int = 1, regions: str | Sequence[str] | dict[str, Any] | None = None,
    mode: str = "knockout", corrupted: Any = None,
    images: Sequence[Any] | None = None, preprocessing: str | None = None,
    batch_size: int = 64,
) -> pd.DataFrame:
    """How much each image region carries to ``dst``: a tidy frame, one row per example and
    region (see the module docstring).

    ``dst``: a span name (``"last"``, ``"question"``) or positions (one list per example,
    e.g. a word's). ``layers``: the window (default every layer). ``target``: a token id,
    a one-token string, one id per example, or None (each example's clean top token).
    ``cell``: tokens per side of a grid region; ``regions`` instead: span names (``"related"``)
    or ``{name: positions per example}``. ``mode="patch"`` patches each region from
    ``corrupted``: a batch of the same prompts with other images, its ``pixel_values``, or
    other images (one for every example, or one each) for the batch's questions.
    ``images``: the images (or ``(width, height)`` sizes) given to ``prepare``, for the pixel
    boxes; default: the batch's examples' images. ``batch_size``: variants per forward.
    """
    if mode not in MODES:
        raise MMLensError(f"unknown mode {mode!r}: use 'knockout' or 'patch'")
    if batch_size < 1:
        raise MMLensError(f"batch_size must be at least 1, got {batch_size}")
    if (mode == "patch") != (corrupted is not None):
        raise MMLensError("mode='patch' needs corrupted= (the same prompts with other images) "
                          "and only it takes one: pass both, or neither for a knockout")
    n_layers = model.cfg.n_layers
    layers = _check_layers(range(n_layers) if layers is None else layers, n_layers, "language")
    if not layers:
        raise MMLensError("layers is empty: give the window's layers (window_layers(...))")
    cross = model.cfg.text.cross_attention_layers
    corrupted_batch = _corrupted_batch(model, batch, corrupted) if mode == "patch" else None
    targets = _per_example(dst, batch)
    tokens = _targets(model, target, len(batch))
    frames = []
    for i in range(len(batch)):
        one = single_example(batch, i)
        offset = batch.input_ids.shape[1] - one.input_ids.shape[1]
        cells = image_token_cells(model, one, 0, original_size(batch, images, i), preprocessing)
        if cross:  # regions are key indices, which no padding shifts
            offset = 0
        example_regions = _regions(cells, cell, regions, batch, i, offset)
        clean = clean_run(model, one)
        token = clean.prediction() if tokens[i] is None else tokens[i]
        positions = [r.positions for r in example_regions]
        if cross and mode == "knockout":
            probs = _cross_blocked_probs(model, one, positions, targets[i] - (
                batch.input_ids.shape[1] - one.input_ids.shape[1]), layers, token, batch_size)
        elif cross:
            probs = _cross_patched_probs(model, one, single_example(corrupted_batch, i),
                                         positions, layers, token, batch_size)
        elif mode == "knockout":
            probs = blocked_probs(model, clean, positions, [(targets[i] - offset, layers)],
                                  token, batch_size)[0]
        else:
            other = clean_run(model, single_example(corrupted_batch, i))
            probs = _patched_probs(model, clean, other, positions, layers[0], token, batch_size)
        frames.append(_frame(i, example_regions, offset, clean.prob(token), probs))
    frame = pd.DataFrame([row for rows in frames for row in rows], columns=COLUMNS)
    # What the map measured, for figures and captions (``mmlens.plotting.causal_map_figure``).
    frame.attrs.update(dst=dst if isinstance(dst, str) else "positions", mode=mode,
                       layers=list(layers), dst_positions=[t.tolist() for t in targets])
    return frame


def _per_example(dst: PositionSpec, batch: MultimodalBatch) -> list[Tensor]:
    positions = resolve_positions(dst, batch, role="dst")
    return positions if isinstance(positions, list) else [positions] * len(batch)


def _targets(model: HookedModel, target: Any, n: int) -> list[int | None]:
    if target is None or isinstance(target, int | str):
        target = [target] * n
    target = list(target)
    if len(target) != n:
        raise MMLensError(f"target gives {len(target)} tokens for {n} examples: give one, or "
                          "one per example")
    tokens = [model.to_single_token(t) if isinstance(t, str) else t for t in target]
    vocab = model.cfg.d_vocab
    bad = [t for t in tokens if t is not None and not 0 <= int(t) < vocab]
    if bad:
        raise MMLensError(f"target token {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    return [None if t is None else int(t) for t in tokens]


def _regions(cells: Any, cell: int, regions: Any, batch: MultimodalBatch, i: int,
             offset: int) -> list[Region]:
    if regions is None:
        return grid_regions(cells, cell)
    if isinstance(regions, str):
        regions = [regions]
    named = ({name: batch.positions(name, i) for name in regions} if not isinstance(regions, dict)
             else {name: torch.as_tensor(per_example[i]).reshape(-1)
                   for name, per_example in regions.items()})
    return span_regions(cells, {name: positions - offset for name, positions in named.items()})


def _corrupted_batch(model: HookedModel, batch: MultimodalBatch,
                     corrupted: Any) -> MultimodalBatch:
    """The batch to patch from: given, the batch with other ``pixel_values``, or the batch's
    questions prepared with other images (one image, or one per example)."""
    if isinstance(corrupted, Tensor):
        if batch.pixel_values is None or corrupted.shape != batch.pixel_values.shape:
            raise MMLensError(f"corrupted pixel_values {tuple(corrupted.shape)} do not match the "
                              "batch's: give pixel values of the same shape, or a batch")
        return dataclasses.replace(batch, pixel_values=corrupted)
    if not isinstance(corrupted, MultimodalBatch):
        if not batch.examples:
            raise MMLensError("corrupted images need the batch's questions: give a batch "
                              "prepared from the same questions with the other images "
                              "(model.prepare), or their pixel_values")
        images = list(corrupted) if isinstance(corrupted, list | tuple) else [corrupted] * len(
            batch)
        corrupted = model.prepare(images, [e.question for e in batch.examples],
                                  examples=batch.examples)
    if not torch.equal(corrupted.input_ids, batch.input_ids):
        raise MMLensError("the corrupted batch's tokens differ from the batch's: patch between "
                          "the same prompts with images giving as many image tokens (prepared "
                          "with the same template and preprocessing)")
    return corrupted


@torch.no_grad()
def blocked_probs(model: HookedModel, clean: CleanRun, regions: list[Tensor],
                  groups: Sequence[tuple[Tensor, Sequence[int]]], token: int,
                  batch_size: int = 64) -> Float[Tensor, "groups regions"]:
    """p(token) with each region's edges from each group's ``dst`` positions blocked in the
    group's layers (``groups``: ``(dst, layers)`` pairs), batched from one clean run: the
    ``len(groups) * len(regions)`` variants, ordered by their first layer, resume
    ``batch_size`` at a time from the chunk's earliest first layer and exact suffix start (a
    row is blocked only in its own layers; earlier layers recompute the clean stream)."""
    if batch_size < 1:
        raise MMLensError(f"batch_size must be at least 1, got {batch_size}")
    if not groups or not regions or not all(len(layers) for _, layers in groups):
        raise MMLensError("blocked_probs needs regions and (dst, layers) groups, each with "
                          "layers: none may be empty")
    starts = [model.family.exact_suffix_start(clean.token_type_ids, int(dst.min()))
              for dst, _ in groups]
    firsts = [min(layers) for _, layers in groups]
    variants = sorted(((g, r) for g in range(len(groups)) for r in range(len(regions))),
                      key=lambda v: (firsts[v[0]], v[0], v[1]))
    n_keys = clean.n_positions
    probs = torch.empty(0)
    for first in range(0, len(variants), batch_size):
        chunk = variants[first:first + batch_size]
        start = min(starts[g] for g, _ in chunk)
        layer = min(firsts[g] for g, _ in chunk)
        blocked = blocked_edges([regions[r] for _, r in chunk], [groups[g][0] for g, _ in chunk],
                                n_keys - start, n_keys)
        causal = torch.arange(n_keys)[None, :] <= torch.arange(start, n_keys)[:, None]
        check_attendable((causal & ~blocked)[:, None], start, "causal_map", "region")
        blocked = blocked.to(clean.resid[0].device)[:, None]
        hooks, masks = [], {}  # one mask per set of rows blocked at a layer
        for blocked_layer in sorted({a for g, _ in chunk for a in groups[g][1]}):
            rows = tuple(blocked_layer in groups[g][1] for g, _ in chunk)
            if rows not in masks:
                masks[rows] = blocked if all(rows) else blocked & torch.tensor(
                    rows, device=blocked.device)[:, None, None, None]
            hooks.append((f"blocks.{blocked_layer}.attn.hook_mask", _masker(masks[rows])))
        suffix = clean.resid[layer][:, start:].expand(len(chunk), -1, -1)
        chunk_probs = _resume(model, clean, suffix, start, layer, hooks, token)
        if first == 0:
            probs = chunk_probs.new_empty(len(groups), len(regions))
        for (g, r), p in zip(chunk, chunk_probs, strict=True):
            probs[g, r] = p
    return probs


def _cross_blocked_probs(model: HookedModel, one: MultimodalBatch, regions: list[Tensor],
                         dst: Tensor, layers: list[int], token: int,
                         batch_size: int) -> Float[Tensor, " regions"]:
    """p(token) with ``dst`` blocked from each region's image keys in the cross-attention
    layers of ``layers``: one full forward per ``batch_size`` regions, a region a row."""
    cross = [layer for layer in layers if layer in model.cfg.text.cross_attention_layers]
    return _cross_rows(model, one, regions, token, batch_size,
                       lambda keys: cross_key_hooks(keys, dst, cross, set(cross)))


@torch.no_grad()
def _cross_patched_probs(model: HookedModel, one: MultimodalBatch, other: MultimodalBatch,
                         regions: list[Tensor], layers: list[int], token: int,
                         batch_size: int) -> Float[Tensor, " regions"]:
    """p(token) with each region's image keys read from ``other``'s image in the
    cross-attention layers of ``layers``: their keys and values (``hook_k`` / ``hook_v``,
    linear in the vision features of those keys; the per-key norm follows) are the corrupted
    run's."""
    names = [f"blocks.{layer}.cross_attn.hook_{kv}" for layer in layers
             if layer in model.cfg.text.cross_attention_layers for kv in "kv"]
    if other.pixel_values.shape != one.pixel_values.shape or not torch.equal(
            other.image_sizes, one.image_sizes):
        raise MMLensError("the corrupted image is tiled otherwise than the clean one (pixel "
                          f"values {tuple(other.pixel_values.shape)}, tiling "
                          f"{other.image_sizes.tolist()} against {tuple(one.pixel_values.shape)}, "
                          f"{one.image_sizes.tolist()}): its keys would be other places of the "
                          "image; patch from images tiled alike (of the same aspect ratio)")
    _, cache = model.run_with_cache(other, names_filter=names.__contains__)

    def hooks(keys: list[Tensor]) -> list:
        def write(activation: Tensor, hook: Any) -> Tensor:
            patched = activation.clone()
            for row, positions in enumerate(keys):
                patched[row, positions] = cache[hook.name][0, positions].to(patched)
            return patched

        return [(name, write) for name in names]

    return _cross_rows(model, one, regions, token, batch_size, hooks)


def _cross_rows(model: HookedModel, one: MultimodalBatch, regions: list[Tensor], token: int,
                batch_size: int, hooks_for: Any) -> Float[Tensor, " regions"]:
    """p(token) from full forwards of ``one``, a region a row, ``batch_size`` rows at a time,
    each chunk under ``hooks_for(the chunk's key indices)``."""
    probs = []
    for first in range(0, len(regions), batch_size):
        chunk = regions[first:first + batch_size]
        n = len(chunk)
        hooks = hooks_for([torch.as_tensor(r, dtype=torch.long) for r in chunk])
        rows = [None if t is None else t.expand(n, *t.shape[1:]) for t in (
            one.input_ids, one.pixel_values, one.attention_mask, one.image_sizes)]
        logits = model.run_with_hooks(rows[0], rows[1], fwd_hooks=hooks,
                                      attention_mask=rows[2], image_sizes=rows[3])
        probs.append(logits[:, -1].float().softmax(-1)[:, token].cpu())
    return torch.cat(probs)


def _masker(blocked: Tensor) -> Any:
    def hook(mask: Tensor, hook: Any) -> Tensor:
        return mask & ~blocked.to(mask.device)  # a no-op unless the model spans devices

    return hook


def _patched_probs(model: HookedModel, clean: CleanRun, other: CleanRun, regions: list[Tensor],
                   layer: int, token: int, batch_size: int) -> Float[Tensor, " regions"]:
    """p(token) with each region's residual entering ``layer`` taken from ``other``."""
    # a bidirectional block (Gemma 3's image, PaliGemma's prefix) is recomputed whole
    start = model.family.exact_suffix_start(clean.token_type_ids,
                                            int(min(int(r.min()) for r in regions)))
    probs = []
    for first in range(0, len(regions), batch_size):
        chunk = regions[first:first + batch_size]
        suffix = clean.resid[layer][:, start:].repeat(len(chunk), 1, 1)
        for row, positions in enumerate(chunk):
            suffix[row, positions - start] = other.resid[layer][0, positions]
        probs.append(_resume(model, clean, suffix, start, layer, [], token))
    return torch.cat(probs)


def _resume(model: HookedModel, clean: CleanRun, suffix: Tensor, start: int, layer: int,
            hooks: list, token: int) -> Float[Tensor, " rows"]:
    """Run ``suffix`` (positions ``start..``) from ``layer`` to the end on the clean keys and
    values of positions ``< start``, with the clean run's token kinds (the family's mask rule)
    and DeepStack features from ``layer`` on; p(token) at the last position per row."""
    n = suffix.shape[0]
    kinds = None if clean.token_type_ids is None else clean.token_type_ids[:, start:].expand(n, -1)
    with model.hooks(fwd_hooks=hooks):
        final = model(suffix, start_at_layer=layer, stop_at_layer=model.cfg.n_layers,
                      past_kv_cache=clean.cache.truncate(start).expand(n),
                      # what the family adds after early blocks (DeepStack), for these positions
                      injections={added: features[:, start:].expand(n, -1, -1)
                                  for added, features in clean.injections.items()
                                  if added >= layer},
                      position_ids=clean.position_ids[..., start:clean.n_positions],
                      attention_mask=torch.ones(n, suffix.shape[1], dtype=torch.long,
                                                device=suffix.device),
                      token_type_ids=kinds)
    return last_logits(model, final).softmax(-1)[:, token].cpu()


def _frame(example: int, regions: list[Region], offset: int, p_base: float,
           probs: Tensor) -> list[tuple]:
    def relative(p: float) -> float:  # a target the clean run gives no mass has no change
        return (p - p_base) / p_base if p_base > 0 else float("nan")

    return [(example, region.label, (region.positions + offset).tolist(), region.tile,
             region.row, region.col, *region.box, p_base, float(p), relative(float(p)))
            for region, p in zip(regions, probs, strict=True)]
