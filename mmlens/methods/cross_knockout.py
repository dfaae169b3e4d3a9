"""Knockout on gated cross-attention (Llama-3.2-Vision): text queries from image keys.

A family whose image never enters the token sequence (``cfg.text.cross_attention_layers``)
sees it only in its cross-attention layers, whose keys are the image tokens of every tile
(image, tile, class token + patches; ``blocks.{l}.cross_attn.hook_mask``
``[batch, 1, text, keys]``). There ``block_attention`` reads an image source as these keys:

- ``"image"``: every key of the prompt's images (the row then gets zero cross-attention
  output: the layer's rule for a row whose every key is blocked); it needs no ``batch=``;
- ``"related"`` / ``"other"`` (patches of tiles) are refused until the family builds an
  image-token map over its keys.

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


def is_image_source(src: Any) -> bool:
    """Whether ``src`` names image keys (a span name of ``IMAGE_SOURCES`` or the map's)."""
    return isinstance(src, str) and src in (*IMAGE_SOURCES, *KEY_MAP_SPANS)


def image_keys(src: str) -> Tensor | list[Tensor] | None:
    """The key indices the image source ``src`` names: None for every key (``"image"``)."""
    if src in KEY_MAP_SPANS:
        raise MMLensError(
            f"src={src!r} on a cross-attention model needs the image-token map of its tiles "
            "(patches of tiles), which this family does not build yet: block 'image' (every "
            "image key)")
    return None


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
