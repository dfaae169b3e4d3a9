"""Attribution patching: a first-order estimate of every activation patch from two forwards
and one backward.

For an activation ``a`` (one position, or one head at one position) the score is

    score = (a_clean - a_corrupted) . d metric / d a      (gradient at the corrupted run)

TransformerLens's denoising convention: it estimates ``metric(corrupted with a patched in from
clean) - metric(corrupted)``, what ``patch_positions`` measures exactly (minus the corrupted
baseline). Scores are summed over the examples of the batch (the metric is usually a mean over
them) and, for the vision tower, over its rows (images, or tiles on LLaVA-NeXT).

    frame = attribution_patching(model, clean, corrupted, metric, names=["resid_pre", "z"])
    attribution_figure(frame)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mmlens.methods.cross_knockout import layer_hook
from mmlens.model.protocol import HookedModel

ATTRIBUTION_NAMES = {
    "resid_pre": "blocks.{}.hook_resid_pre",
    "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out",
    "z": "blocks.{}.attn.hook_z",
    "vision_resid_pre": "vision.blocks.{}.hook_resid_pre",
}
"""Activations ``attribution_patching`` scores; ``z`` per head, ``vision_resid_pre`` per
vision-tower position (0 = CLS)."""

PER_HEAD = ("z",)


def attribution_patching(
    model: HookedModel, clean: Any, corrupted: Any, metric: Callable[[Tensor], Tensor], *,
    names: str | Sequence[str] = "resid_pre",
) -> pd.DataFrame:
    """Scores of every (layer, position[, head]) of the ``names`` activations: a tidy frame
    with columns ``name``, ``layer``, ``pos``, ``head`` (per-head activations only, else
    missing) and ``score``.

    ``clean`` and ``corrupted`` are ``MultimodalBatch``es of the same shape (equal-length
    prompts; corrupt the image, or tokens of equal length); ``metric`` maps logits
    ``[batch, pos, d_vocab]`` to a scalar.
    """
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in ATTRIBUTION_NAMES]
    if unknown or not names:
        raise ValueError(f"names {unknown} cannot be scored: use some of "
                         f"{', '.join(ATTRIBUTION_NAMES)}")
    if clean.input_ids.shape != corrupted.input_ids.shape:
        raise ValueError(f"clean prompts are {tuple(clean.input_ids.shape)} but corrupted ones "
                         f"{tuple(corrupted.input_ids.shape)}: attribution patching compares "
                         "activations position by position, so both need the same shape")
    hooks = {name: [ATTRIBUTION_NAMES[name].format(layer) if name.startswith("vision") else
                    layer_hook(model, ATTRIBUTION_NAMES[name], layer)
                    for layer in range(_n_layers(model, name))] for name in names}
    wanted = {hook for per_name in hooks.values() for hook in per_name}
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean, names_filter=wanted.__contains__)
    corrupted_acts = _corrupted_with_grads(model, corrupted, metric, wanted)
    frames = []
    for name in names:
        for layer, hook in enumerate(hooks[name]):
            activation, grad = corrupted_acts[hook]
            delta = clean_cache[hook].to(grad) - activation
            # [rows, pos, (head,) d] -> [pos, (head)]: summed over examples and features.
            score = (delta * grad).sum(-1).sum(0)
            frames.append(_frame(name, layer, score))
    frame = pd.concat(frames, ignore_index=True)
    if not any(name in PER_HEAD for name in names):
        frame = frame.drop(columns="head")
    return frame


def _n_layers(model: Any, name: str) -> int:
    return model.cfg.vision.n_layers if name.startswith("vision") else model.cfg.n_layers


def _corrupted_with_grads(model: Any, corrupted: Any, metric: Callable[[Tensor], Tensor],
                          wanted: set[str]) -> dict[str, tuple[Tensor, Tensor]]:
    """Each wanted activation of the corrupted run with the metric's gradient there."""
    kept: dict[str, Tensor] = {}

    def keep(activation: Tensor, hook: Any) -> Tensor:
        kept[hook.name] = activation
        return activation

    with torch.enable_grad(), model.hooks(fwd_hooks=[(name, keep) for name in sorted(wanted)]):
        value = metric(model(corrupted))
    if value.ndim != 0:
        raise ValueError(f"the metric returned shape {tuple(value.shape)}: attribution patching "
                         "needs a scalar (average over the batch)")
    order = sorted(kept)
    grads = torch.autograd.grad(value, [kept[name] for name in order], allow_unused=True)
    return {name: (kept[name].detach(), torch.zeros_like(kept[name]) if g is None else g.detach())
            for name, g in zip(order, grads, strict=True)}


def _frame(name: str, layer: int, score: Float[Tensor, "pos ..."]) -> pd.DataFrame:
    score = score.detach().float().cpu()
    if score.ndim == 1:
        return pd.DataFrame({"name": name, "layer": layer, "pos": range(len(score)),
                             "head": pd.array([pd.NA] * len(score), dtype="Int64"),
                             "score": score.tolist()})
    pos, head = torch.meshgrid(torch.arange(score.shape[0]), torch.arange(score.shape[1]),
                               indexing="ij")
    return pd.DataFrame({"name": name, "layer": layer, "pos": pos.reshape(-1).tolist(),
                         "head": pd.array(head.reshape(-1).tolist(), dtype="Int64"),
                         "score": score.reshape(-1).tolist()})
