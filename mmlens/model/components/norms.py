"""Normalisation layers: RMSNorm (Llama) and LayerNorm (CLIP), each with a hooked scale."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn import functional as F
from transformer_lens.hook_points import HookPoint


class RMSNorm(nn.Module):
    """``y = w * x / sqrt(mean(x^2) + eps)``, computed in float32 as Llama does.

    ``hook_scale`` is the divisor ``sqrt(mean(x^2) + eps)``, ``[batch, pos, 1]``, the name
    TransformerLens's cache helpers read for ``apply_ln=True``.
    """

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d_model))
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    @property
    def gain(self) -> Float[Tensor, " d_model"]:
        """What multiplies the normalised input: ``w``."""
        return self.w

    def forward(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_model"]:
        dtype = x.dtype
        x = x.float()
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        normalized = self.hook_normalized((x / scale).to(dtype))
        return self.w * normalized


class LayerNorm(nn.Module):
    """``y = w * (x - mean(x)) / sqrt(var(x) + eps) + b``; ``hook_scale`` is the divisor.

    While no hook replaces ``hook_scale`` or ``hook_normalized``, the output is torch's fused
    ``layer_norm`` (Hugging Face's numbers bit for bit), and with no hook on them at all the
    intermediates are not computed; an edit there flows on as computed.
    """

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d_model))
        self.b = nn.Parameter(torch.zeros(d_model))
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_model"]:
        if not any(hook.fwd_hooks or hook.bwd_hooks
                   for hook in (self.hook_scale, self.hook_normalized)):
            # nothing reads or edits the intermediates: skip computing them (the same output)
            return F.layer_norm(x, (x.shape[-1],), self.w, self.b, self.eps)
        dtype = x.dtype
        centred = x.float() - x.float().mean(-1, keepdim=True)
        divisor = (centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
        scale = self.hook_scale(divisor)
        computed = (centred / scale).to(dtype)
        normalized = self.hook_normalized(computed)
        if scale is divisor and normalized is computed:
            return F.layer_norm(x, (x.shape[-1],), self.w, self.b, self.eps)
        return normalized * self.w + self.b
