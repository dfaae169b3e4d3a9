"""Running the decoder blocks: mask, rotary tables, start/stop layers, key/value cache.

The positions come from the model's family (``Family.position_ids``), so this loop serves 1D
and multimodal rotary schemes alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jaxtyping import Float, Int
from torch import Tensor, nn

from mmlens.model.components import LanguageBlock
from mmlens.model.components.attention import default_mask
from mmlens.model.config import LanguageConfig
from mmlens.model.kv_cache import KeyValueCache


def positions_from_mask(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """Position ids that skip left padding: the first real token of every row is position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def build_mask(
    attention_mask: Int[Tensor, "batch k_pos"], q_len: int
) -> Tensor | None:
    """The boolean "may attend" mask ``[batch, 1, q_pos, k_pos]``, or None for plain causal.

    Padding queries may attend everywhere: their outputs are never read, and this keeps their
    softmax finite.
    """
    batch, k_len = attention_mask.shape
    has_padding = not bool(attention_mask.all())
    if not has_padding and q_len == k_len:
        return None
    allowed = default_mask(batch, q_len, k_len, True, attention_mask.device)
    if has_padding:
        key_ok = attention_mask.bool()[:, None, None, :]
        query_pad = ~attention_mask.bool()[:, None, -q_len:, None]
        allowed = (allowed & key_ok) | query_pad
    return allowed


class LanguageStack:
    """Runs the decoder blocks: ``resid [batch, pos, d_model]`` in and out.

    The blocks themselves are registered on the model as ``model.blocks`` (TransformerLens's
    hook names ``blocks.{l}.*``); this object holds the loop around them. ``rotary`` maps
    ``(position_ids, dtype)`` to the ``(cos, sin)`` tables (the family builds it).
    """

    def __init__(self, cfg: LanguageConfig, blocks: nn.ModuleList, rotary: Any):
        self.cfg = cfg
        self.blocks = blocks
        self.rotary = rotary

    @staticmethod
    def build_blocks(cfg: LanguageConfig) -> nn.ModuleList:
        return nn.ModuleList([LanguageBlock(cfg) for _ in range(cfg.n_layers)])

    def __call__(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        *,
        attention_mask: Int[Tensor, "batch k_pos"],
        position_ids: Tensor,
        start_at_layer: int = 0,
        stop_at_layer: int | None = None,
        past_kv_cache: KeyValueCache | None = None,
        masks: Sequence[Tensor | None] | None = None,
        injections: dict[int, Tensor] | None = None,
        cross: Any = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """``attention_mask`` covers the cached and the new positions; ``position_ids`` are the
        new positions' (``[batch, pos]``, or the family's own layout such as M-RoPE's).
        ``masks``: one "may attend" mask ``[batch, 1, q_pos, k_pos]`` (or None for plain
        causal) per layer, from the family's mask rule; default ``build_mask`` for every layer.
        ``injections[l]`` ``[batch, pos, d_model]`` is added to block ``l``'s output
        (Qwen3-VL's DeepStack features, ``blocks.{l}.hook_deepstack``). ``cross``: what the
        blocks of ``cfg.cross_attention_layers`` attend to (``CrossAttentionInputs``; None
        without images).
        """
        q_len = resid.shape[1]
        if past_kv_cache is not None and self.cfg.cross_attention_layers:
            if cross is not None and not past_kv_cache.frozen:
                past_kv_cache.cross = cross
            elif cross is None and past_kv_cache.cross is not None:  # positions after an image
                cross = past_kv_cache.cross.after(attention_mask.shape[1] - q_len, q_len)
        rotary = self.rotary(position_ids, resid.dtype)
        if masks is None:
            masks = [build_mask(attention_mask, q_len)] * self.cfg.n_layers
        stop = self.cfg.n_layers if stop_at_layer is None else stop_at_layer
        for layer in range(start_at_layer, stop):
            past = None if past_kv_cache is None else past_kv_cache.layers[layer]
            resid, present = self.blocks[layer](
                resid, mask=masks[layer], causal=True, rotary=rotary, past_key_value=past,
                **({"inject": injections[layer]} if injections and layer in injections else {}),
                **({"cross": cross} if layer in self.cfg.cross_attention_layers else {}),
            )
            if past_kv_cache is not None:
                past_kv_cache.update(layer, present)
        return resid
