"""Knockout on gated cross-attention (Llama-3.2-Vision): text queries from image keys.

A family whose image never enters the token sequence (``cfg.text.cross_attention_layers``)
sees it only in its cross-attention layers, whose keys are the image tokens of every tile
(image, tile, class token + patches; ``blocks.{l}.cross_attn.hook_mask``
``[batch, 1, text, keys]``). There ``block_attention`` reads an image source as these keys:

- ``"image"``: every key of the prompt's images (the row then gets zero cross-attention
  output: the layer's rule for a row whose every key is blocked); it needs no ``batch=``;
- ``"related"`` / ``"other"`` (patches of tiles, from boxes through the image-token map of
  the tiles, ``mmlens.inputs.layouts.cross_tiles``): the keys the batch's key span holds
  (``MultimodalBatch.key_spans``); they need ``batch=``. A span of keys is also a source by
  itself: any span name of ``batch.key_spans``.

A text source (``"question"``, explicit positions) is a self-attention edge: the
cross-attention layers of the window are left alone, as an image source leaves the
self-attention layers alone.
Destinations are text positions of the run (absolute positions of the prompt; no key/value
cache: with one the run's queries are only its new positions).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mmlens.core.errors import MMLensError

IMAGE_SOURCES = ("image",)
"""Span names that mean image keys on a cross-attention model."""
KEY_MAP_SPANS = ("related", "other")


def is_image_source(src: Any, batch: Any = None) -> bool:
    """Whether ``src`` names image keys (``"image"``, ``"related"`` / ``"other"``, or a key
    span of ``batch``)."""
    return isinstance(src, str) and (src in (*IMAGE_SOURCES, *KEY_MAP_SPANS) or (
        batch is not None and src in batch.key_spans))


def image_keys(src: str, batch: Any = None) -> list[Tensor] | None:
    """The key indices the image source ``src`` names, one tensor per example: None for
    every key (``"image"``)."""
    if src in IMAGE_SOURCES:
        return None
    if batch is None:
        raise MMLensError(f"src={src!r} on a cross-attention model names image keys of each "
                          "example: pass batch= (a batch prepared with boxes)")
    if src not in batch.key_spans:
        raise MMLensError(f"span {src!r} of this batch holds no cross-attention keys: prepare "
                          "the batch with boxes= for related / other")
    return [batch.positions(src, i) for i in range(len(batch))]


def cross_key_hooks(keys: list[Tensor] | None, dst: Tensor | list[Tensor], layers: Any,
                    cross: Any, heads: list[int] | None = None,
                    n_heads: int | None = None) -> list[tuple[str, Callable]]:
    """``hook_mask`` edits blocking ``dst`` from ``keys`` (per example; None = every key) in
    the cross-attention layers among ``layers``."""
    return [(f"blocks.{layer}.cross_attn.hook_mask",
             cross_mask_editor(keys, dst, heads, n_heads, layer))
            for layer in layers if layer in cross]


def cross_mask_editor(keys: Tensor | list[Tensor] | None, dst: Tensor | list[Tensor],
                      heads: list[int] | None, n_heads: int | None,
                      layer: int) -> Callable[[Tensor, Any], Tensor]:
    """A ``hook_mask`` edit: False on every (dst text row, key) edge; ``keys`` None = all."""

    def block_keys(mask: Tensor, hook: Any) -> Tensor:
        where = f"block_attention at {getattr(hook, 'name', f'layer {layer}')}"
        n, _, q_len, k_len = mask.shape
        blocked = torch.zeros(n, 1, q_len, k_len, dtype=torch.bool, device=mask.device)
        for i in range(n):
            rows = dst[i] if isinstance(dst, list) else dst
            cols = keys[i] if isinstance(keys, list) else keys
            if len(rows) and int(rows.max()) >= q_len:
                raise IndexError(f"{where}: dst position {int(rows.max())} (example {i}) is past "
                                 f"this run's {q_len} text positions")
            if cols is not None and len(cols) and int(cols.max()) >= k_len:
                raise IndexError(f"{where}: image key {int(cols.max())} (example {i}) is past "
                                 f"the {k_len} cross-attention keys")
            rows = rows.to(mask.device)
            if cols is None:
                blocked[i, 0, rows] = True
            else:
                blocked[i, 0, rows[:, None], cols.to(mask.device)[None, :]] = True
        if heads is not None:
            per_head = torch.zeros(n, n_heads, q_len, k_len, dtype=torch.bool,
                                   device=mask.device)
            per_head[:, heads] = blocked[:, 0, None]
            blocked, mask = per_head, mask.expand(n, n_heads, q_len, k_len)
        return mask & ~blocked

    return block_keys


def layer_hook(model: Any, template: str, layer: int) -> str:
    """``template`` (``"blocks.{}.attn.hook_z"``) at ``layer``: in a cross-attention layer the
    same hook of its ``cross_attn`` module (per head, over the text positions)."""
    name = template.format(layer)
    if layer in model.cfg.text.cross_attention_layers:
        return name.replace(".attn.", ".cross_attn.")
    return name
