"""Rotary position embeddings with the checkpoint's own inverse frequencies (Llama-3 too)."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor


class RotaryEmbedding:
    """cos/sin tables for positions: ``emb = [p * inv_freq, p * inv_freq]``.

    ``inv_freq`` comes from the config's rope settings (default, linear, llama3, ...), so the
    same class serves Vicuna and Llama-3 text towers.
    """

    def __init__(self, inv_freq: Tensor, attention_scaling: float = 1.0):
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies.
        self.inv_freq = inv_freq.detach().float().cpu()
        self.attention_scaling = attention_scaling

    @torch.no_grad()
    def __call__(
        self, position_ids: Int[Tensor, "batch pos"], dtype: torch.dtype
    ) -> tuple[Float[Tensor, "batch pos 1 d_head"], Float[Tensor, "batch pos 1 d_head"]]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos[:, :, None, :], sin[:, :, None, :]


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    x: Float[Tensor, "batch pos head d_head"], cos: Tensor, sin: Tensor
) -> Float[Tensor, "batch pos head d_head"]:
    """Rotate query or key vectors by their positions' angles."""
    return x * cos + rotate_half(x) * sin
