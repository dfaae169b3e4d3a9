"""MLPs: Llama's gated SiLU MLP and CLIP's quick-GELU MLP."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn import functional as F
from transformer_lens.hook_points import HookPoint
from transformers.activations import ACT2FN


class GatedMLP(nn.Module):
    """``out = (act(x W_gate) * (x W_in)) W_out``.

    Weights are stored in the layout a matmul wants (``[out, in]``); ``W_in``, ``W_gate`` and
    ``W_out`` are TransformerLens-shaped views of them (``[d_model, d_mlp]``, ``[d_mlp, d_model]``).
    """

    def __init__(self, d_model: int, d_mlp: int, act_fn: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_weight = nn.Parameter(torch.empty(d_mlp, d_model))
        self.in_weight = nn.Parameter(torch.empty(d_mlp, d_model))
        self.out_weight = nn.Parameter(torch.empty(d_model, d_mlp))
        self.gate_bias = nn.Parameter(torch.zeros(d_mlp)) if bias else None
        self.in_bias = nn.Parameter(torch.zeros(d_mlp)) if bias else None
        self.out_bias = nn.Parameter(torch.zeros(d_model)) if bias else None
        self.act = ACT2FN[act_fn]
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp], gate pre-activation
        self.hook_pre_linear = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    @property
    def W_gate(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.gate_weight.T

    @property
    def W_in(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.in_weight.T

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        return self.out_weight.T

    @property
    def b_out(self) -> Tensor:
        return self.out_bias if self.out_bias is not None else self.out_weight.new_zeros(
            self.out_weight.shape[0])

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(F.linear(x, self.gate_weight, self.gate_bias))
        pre_linear = self.hook_pre_linear(F.linear(x, self.in_weight, self.in_bias))
        post = self.hook_post(self.act(pre) * pre_linear)
        return F.linear(post, self.out_weight, self.out_bias)


class VisionMLP(nn.Module):
    """``out = act(x W_in + b_in) W_out + b_out`` with CLIP's quick-GELU by default."""

    def __init__(self, d_model: int, d_mlp: int, act_fn: str = "quick_gelu"):
        super().__init__()
        self.in_weight = nn.Parameter(torch.empty(d_mlp, d_model))
        self.in_bias = nn.Parameter(torch.zeros(d_mlp))
        self.out_weight = nn.Parameter(torch.empty(d_model, d_mlp))
        self.out_bias = nn.Parameter(torch.zeros(d_model))
        self.act = ACT2FN[act_fn]
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    @property
    def W_in(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.in_weight.T

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        return self.out_weight.T

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(F.linear(x, self.in_weight, self.in_bias))
        post = self.hook_post(self.act(pre))
        return F.linear(post, self.out_weight, self.out_bias)
