"""Activation patching from a clean run into a corrupted run, on multimodal batches.

A patch copies clean activations into the corrupted run at chosen positions (and heads) of
one hook; the metric on the patched logits says how much of the clean behaviour they carry.

    clean, corrupted = batch, corrupt_image(batch, noise=0.5)
    metric = logit_diff_metric(answer_ids, wrong_ids)
    scores = patch_positions(model, clean, corrupted, metric, component="resid_pre")  # [layer, pos]
    patching_frame(scores, ("layer", "position"))

Clean and corrupted prompts of different lengths are patched by span: ``positions="question"``
pairs the j-th question token of each (``[layer, j]``), ``patch_spans`` patches whole spans.
``attribution_patching`` estimates every patch at once from one backward pass.
TransformerLens's ``transformer_lens.patching`` functions run too, inside
``with model.bind_images(corrupted.pixel_values):`` with equal-length, unpadded prompts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mmlens.inputs.batch import MultimodalBatch
from mmlens.methods.attribution import attribution_patching as attribution_patching
from mmlens.methods.cross_knockout import layer_hook
from mmlens.model.kv_cache import KeyValueCache
from mmlens.model.protocol import HookedModel

COMPONENTS = {
    "resid_pre": "blocks.{}.hook_resid_pre",
    "resid_mid": "blocks.{}.hook_resid_mid",
    "resid_post": "blocks.{}.hook_resid_post",
    "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out",
    "z": "blocks.{}.attn.hook_z",
}
"""Patchable components: the residual stream, the sublayer outputs, per-head outputs (``z``)."""

Metric = Callable[[Tensor], Tensor]
"""``logits [batch, pos, d_vocab] -> scalar`` (the TransformerLens convention)."""

Pairs = list[tuple[Tensor, Tensor]]
"""Per example: (positions in the corrupted run, the clean positions copied into them)."""


def logit_diff_metric(answer: int | Sequence[int], wrong: int | Sequence[int]) -> Metric:
    """Mean over the batch of ``logit[answer] - logit[wrong]`` at the last position."""
    def metric(logits: Tensor) -> Tensor:
        last = logits[:, -1].float()
        return (_pick(last, answer) - _pick(last, wrong)).mean()

    return metric


def answer_prob_metric(answer: int | Sequence[int]) -> Metric:
    """Mean over the batch of the answer token's probability at the last position."""
    def metric(logits: Tensor) -> Tensor:
        return _pick(logits[:, -1].float().softmax(-1), answer).mean()

    return metric


def _pick(values: Tensor, tokens: int | Sequence[int]) -> Tensor:
    index = torch.as_tensor(tokens, device=values.device).reshape(-1)
    if len(index) not in (1, values.shape[0]):
        raise ValueError(f"got {len(index)} answer tokens for a batch of {values.shape[0]}: give "
                         "one token, or one per example")
    return values.gather(-1, index.expand(values.shape[0])[:, None])[:, 0]


def corrupt_image(batch: MultimodalBatch, noise: float = 1.0, seed: int = 0) -> MultimodalBatch:
    """The same prompts with Gaussian noise of std ``noise`` added to the pixel values."""
    _require_images(batch, "batch")
    gen = torch.Generator().manual_seed(seed)
    pixels = batch.pixel_values
    noised = pixels + noise * torch.randn(pixels.shape, generator=gen).to(pixels)
    return dataclasses.replace(batch, pixel_values=noised)


def patch_activation(
    hook_name: str, clean_activation: Tensor, pairs: Pairs | None = None, *,
    head: int | None = None,
) -> list[tuple[str, Callable[[Tensor, Any], Tensor]]]:
    """A hook that copies ``clean_activation`` into the run at ``hook_name``.

    The run must hold one example per clean example. ``pairs`` (per example: corrupted
    positions, clean positions) limits the copy; None copies everything (the shapes must
    match). ``head`` limits it to one head of a ``[batch, pos,
    head, d_head]`` activation such as ``hook_z``.
    """
    return [(hook_name, _stacked_patch(hook_name, clean_activation, [(pairs, head)]))]


def patch_positions(
    model: HookedModel, clean: MultimodalBatch, corrupted: MultimodalBatch, metric: Metric, *,
    component: str = "resid_pre", layers: Sequence[int] | None = None,
    positions: str | None = None, batch_size: int = 16,
) -> Float[Tensor, "layer pos"]:
    """Patch one position at a time: ``[layer, pos]``, TransformerLens's layout.

    ``positions=None`` walks every position (clean and corrupted must have the same length);
    a span name walks that span's tokens, pairing the j-th of clean and corrupted (examples
    whose span is shorter than j are left unpatched at j). ``component="z"`` patches all heads
    together; ``patch_heads`` patches them one by one. ``batch_size``: see ``patch_spans``.
    """
    layers = _check(model, clean, corrupted, component, layers)
    cells = [(pairs, None) for pairs in _position_columns(clean, corrupted, positions)]
    return _sweep(model, clean, corrupted, metric, component, layers, cells, batch_size)


def patch_spans(
    model: HookedModel, clean: MultimodalBatch, corrupted: MultimodalBatch, metric: Metric, *,
    spans: Sequence[str], component: str = "resid_pre", layers: Sequence[int] | None = None,
    batch_size: int = 16,
) -> Float[Tensor, "layer span"]:
    """Patch all positions of each span at once: ``[layer, span]`` (spans may sit at different
    positions in clean and corrupted, but must be as long in both).

    Every sweep is exact and cheaper than one full forward per cell: the corrupted run is
    cached once, a patch at layer ``l`` and positions from ``p`` on resumes from the
    corrupted residual stream entering ``l`` at ``p`` (no image encoding, no recomputed lower
    layers or earlier positions), and the cells of a layer run together, up to
    ``batch_size`` rows (examples x cells) per forward. The metric is called
    once per cell, on that cell's ``[batch, pos, d_vocab]`` logits.
    """
    layers = _check(model, clean, corrupted, component, layers)
    cells = [(_span_pairs(clean, corrupted, name), None) for name in spans]
    return _sweep(model, clean, corrupted, metric, component, layers, cells, batch_size)


def patch_heads(
    model: HookedModel, clean: MultimodalBatch, corrupted: MultimodalBatch, metric: Metric, *,
    layers: Sequence[int] | None = None, positions: str | None = None,
    by_position: bool = False, batch_size: int = 16,
) -> Float[Tensor, "layer head"] | Float[Tensor, "layer pos head"]:
    """Patch each head's output (``hook_z``): ``[layer, head]`` over all positions (or all
    positions of the span ``positions``); ``by_position=True`` patches one position at a time
    as ``patch_positions`` does, giving ``[layer, pos, head]``. ``batch_size``: see
    ``patch_spans``."""
    layers = _check(model, clean, corrupted, "z", layers)
    if by_position:
        columns = _position_columns(clean, corrupted, positions)
    elif positions is None:
        _require_equal_lengths(clean, corrupted)
        columns = [None]
    else:
        columns = [_span_pairs(clean, corrupted, positions)]
    heads = range(model.cfg.n_heads)
    cells = [(pairs, head) for pairs in columns for head in heads]
    scores = _sweep(model, clean, corrupted, metric, "z", layers, cells, batch_size)
    scores = scores.reshape(len(layers), len(columns), len(heads))
    return scores if by_position else scores[:, 0]


def patching_frame(scores: Tensor, dims: Sequence[str] = ("layer", "position"),
                   labels: dict[str, Sequence[Any]] | None = None,
                   value: str = "metric") -> pd.DataFrame:
    """A tidy frame of a patching result: one row per cell, one column per dimension.

    ``labels`` names a dimension's entries (``{"span": ["image", "question"]}``, or the
    ``{"layer": layers}`` a sweep ran over); otherwise they are numbered from 0.
    """
    if len(dims) != scores.ndim:
        raise ValueError(f"scores have {scores.ndim} dimensions but dims names {len(dims)}")
    labels = labels or {}
    axes = [list(labels.get(dim, range(size))) for dim, size in zip(dims, scores.shape,
                                                                    strict=True)]
    index = pd.MultiIndex.from_product(axes, names=list(dims))
    return pd.DataFrame({value: scores.detach().cpu().reshape(-1).tolist()},
                        index=index).reset_index()


# ----------------------------------------------------------------- internals
def _check(model: HookedModel, clean: MultimodalBatch, corrupted: MultimodalBatch, component: str,
           layers: Sequence[int] | None) -> list[int]:
    if component not in COMPONENTS:
        raise ValueError(f"component {component!r} is not patchable: use one of "
                         f"{', '.join(COMPONENTS)}")
    for role, batch in (("clean", clean), ("corrupted", corrupted)):
        if not isinstance(batch, MultimodalBatch):
            raise TypeError(f"the {role} input must be a MultimodalBatch (model.prepare(...)); "
                            "for token tensors use transformer_lens.patching inside "
                            "model.bind_images(pixel_values)")
        _require_images(batch, role)
    if len(clean) != len(corrupted):
        raise ValueError(f"clean has {len(clean)} examples but corrupted has {len(corrupted)}: "
                         "pair every clean example with one corrupted example")
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"layers {bad} are outside the model's layers 0..{n_layers - 1}")
    return layers


def _require_images(batch: MultimodalBatch, role: str) -> None:
    if batch.pixel_values is None:
        raise ValueError(f"the {role} batch has no pixel_values: a multimodal prompt needs its "
                         "image; build the batch with model.prepare(images, questions)")


def _require_equal_lengths(clean: MultimodalBatch, corrupted: MultimodalBatch) -> None:
    if clean.input_ids.shape != corrupted.input_ids.shape:
        raise ValueError(f"clean prompts have {clean.input_ids.shape[1]} positions but corrupted "
                         f"ones {corrupted.input_ids.shape[1]}: patch by span "
                         "(positions='question', or patch_spans) or use prompts of equal length")


def _position_columns(clean: MultimodalBatch, corrupted: MultimodalBatch,
                      positions: str | None) -> list[Pairs]:
    """One patch per position: every position (equal lengths), or the j-th of a span."""
    if positions is None:
        _require_equal_lengths(clean, corrupted)
        return [_same_position(clean, p) for p in range(clean.input_ids.shape[1])]
    span = _span_pairs(clean, corrupted, positions)
    width = max(len(target) for target, _ in span)
    return [[(t[j:j + 1], s[j:j + 1]) for t, s in span] for j in range(width)]


def _same_position(batch: MultimodalBatch, position: int) -> Pairs:
    at = torch.tensor([position])
    return [(at, at)] * len(batch)


def _span_pairs(clean: MultimodalBatch, corrupted: MultimodalBatch, name: str) -> Pairs:
    pairs = []
    for i, (source, target) in enumerate(zip(clean.prompt_span(name, "patching"),
                                             corrupted.prompt_span(name, "patching"),
                                             strict=True)):
        if len(source) != len(target):
            raise ValueError(f"span {name!r} of example {i} has {len(source)} positions in the "
                             f"clean prompt but {len(target)} in the corrupted one: patch spans "
                             "of equal length, or a shorter span both share")
        pairs.append((target, source))
    return pairs


def _clean_cache(model: HookedModel, clean: MultimodalBatch, component: str,
                 layers: list[int]) -> Any:
    names = {layer_hook(model, COMPONENTS[component], layer) for layer in layers}
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=lambda name: name in names)
    return cache


Cell = tuple[Pairs | None, int | None]
"""One patch of a sweep: its (corrupted, clean) position pairs and its head (None: all)."""


def _sweep(model: HookedModel, clean: MultimodalBatch, corrupted: MultimodalBatch, metric: Metric,
           component: str, layers: list[int], cells: list[Cell],
           batch_size: int) -> Float[Tensor, "layer cell"]:
    """Score every cell at every layer, resuming from the corrupted run: a patch at layer
    ``l`` whose first position is ``p`` changes nothing before ``p`` (causal attention), so
    its cell reruns only positions ``p..`` from layer ``l`` on, attending to the corrupted
    run's cached keys/values below ``p``; the positions below ``p`` keep the corrupted logits
    (so do left-padding positions, whose logits predict nothing).
    The cells of a layer are sorted by first position and stacked ``batch_size`` rows at a
    time, each stack starting at its own first position."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    clean_cache = _clean_cache(model, clean, component, layers)
    starts = {COMPONENTS["resid_pre"].format(layer) for layer in layers}
    deepstack = [n for n in model.hook_dict if n.startswith("blocks.") and n.endswith(
        ".hook_deepstack")]  # features added after early blocks (Qwen3-VL), resumed with the run
    kv_cache = KeyValueCache.empty(model.cfg.n_layers)
    with torch.no_grad():
        corrupted_logits, corrupted_cache = model.run_with_cache(
            corrupted, names_filter=lambda name: name in starts or name in deepstack,
            past_kv_cache=kv_cache)
    n, n_pos = corrupted.input_ids.shape
    per_forward = max(1, batch_size // n)
    mask = corrupted.attention_mask
    # Resuming from a residual stream: the prompt's positions (3D for M-RoPE families).
    positions = model.position_ids(corrupted.input_ids, mask, image_sizes=corrupted.image_sizes)
    # the token kinds a family's mask rule reads (Gemma 3's images, PaliGemma's prefix)
    kinds = model.family.token_type_ids(model.cfg, corrupted.input_ids)
    order = sorted(range(len(cells)), key=lambda c: _first_position(cells[c], n_pos))
    scores = torch.zeros(len(layers), len(cells))
    for row, layer in enumerate(layers):
        name = layer_hook(model, COMPONENTS[component], layer)
        start = corrupted_cache[COMPONENTS["resid_pre"].format(layer)]
        for first in range(0, len(cells), per_forward):
            chunk = order[first:first + per_forward]
            offset = _first_position(cells[chunk[0]], n_pos)
            if kinds is not None:  # a bidirectional block is rerun whole (one example's)
                offset = 0 if n > 1 else model.family.exact_suffix_start(kinds, offset)
            copies = len(chunk)
            hooks = [(name, _stacked_patch(name, clean_cache[name], [cells[c] for c in chunk],
                                           offset))]
            with torch.no_grad():
                injections = {int(hook_name.split(".")[1]):
                              corrupted_cache[hook_name][:, offset:].repeat(copies, 1, 1)
                              for hook_name in deepstack if hook_name in corrupted_cache.cache_dict}
                logits = model.run_with_hooks(
                    start[:, offset:].repeat(copies, 1, 1), start_at_layer=layer,
                    fwd_hooks=hooks, past_kv_cache=kv_cache.truncate(offset).tile(copies),
                    injections=injections,
                    attention_mask=None if mask is None else mask[:, offset:].repeat(copies, 1),
                    # One example: its row of positions broadcasts in the rotary tables.
                    position_ids=positions[..., offset:] if n == 1 else positions[
                        ..., offset:].repeat(*[1] * (positions.ndim - 2), copies, 1),
                    token_type_ids=None if kinds is None else kinds[:, offset:].repeat(copies, 1),
                )
            for c, part in zip(chunk, logits.split(n), strict=True):
                full = torch.cat([corrupted_logits[:, :offset].to(part), part], dim=1)
                scores[row, c] = float(metric(full))
    return scores


def _first_position(cell: Cell, n_pos: int) -> int:
    """The first corrupted position a cell patches (the last position if it patches none)."""
    pairs, _ = cell
    if pairs is None:
        return 0
    targets = [int(target.min()) for target, _ in pairs if len(target)]
    return min(targets, default=n_pos - 1)


def _stacked_patch(name: str, clean_activation: Tensor, cells: list[Cell],
                   offset: int = 0) -> Callable[[Tensor, Any], Tensor]:
    """A hook patching cell ``c`` into rows ``c * n ... c * n + n - 1`` of a batch that stacks
    ``len(cells)`` copies of the ``n`` corrupted examples (``n`` = the clean batch size), in
    a run of the positions from ``offset`` on."""
    n = clean_activation.shape[0]

    def patch(activation: Tensor, hook: Any) -> Tensor:
        if activation.shape[0] != n * len(cells) or (
            any(pairs is None for pairs, _ in cells)
            and activation.shape[1:] != clean_activation.shape[1:]
        ):
            raise ValueError(f"{name}: the corrupted activation is {tuple(activation.shape)} "
                             f"but the clean one {tuple(clean_activation.shape)} (for "
                             f"{len(cells)} patches): pair every corrupted example with one "
                             "clean example, and patch prompts of different lengths by span")
        patched = activation.clone()
        for c, (pairs, head) in enumerate(cells):
            heads = slice(None) if head is None else head
            if pairs is None:
                patched[c * n:(c + 1) * n, :, heads] = clean_activation[:, :, heads].to(patched)
                continue
            for i, (target, source) in enumerate(pairs):
                patched[c * n + i, target - offset, heads] = clean_activation[
                    i, source, heads].to(patched)
        return patched

    return patch
