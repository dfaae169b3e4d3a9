"""The multimodal projector: ``out = act(x W_1 + b_1) W_2 + b_2`` from vision to text width."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn import functional as F
from transformer_lens.hook_points import HookPoint
from transformers.activations import ACT2FN


class Projector(nn.Module):
    """Hooks: ``hook_in`` ``[images, n_features, d_vision]``, ``hook_pre``/``hook_post``
    ``[images, n_features, d_model]`` around the activation, ``hook_out`` (the image features
    that are merged into the token embeddings) ``[images, n_features, d_model]``."""

    def __init__(self, d_vision: int, d_model: int, act_fn: str = "gelu", bias: bool = True):
        super().__init__()
        self.in_weight = nn.Parameter(torch.empty(d_model, d_vision))
        self.in_bias = nn.Parameter(torch.zeros(d_model)) if bias else None
        self.out_weight = nn.Parameter(torch.empty(d_model, d_model))
        self.out_bias = nn.Parameter(torch.zeros(d_model)) if bias else None
        self.act = ACT2FN[act_fn]
        self.hook_in = HookPoint()  # [images, n_features, d_vision]
        self.hook_pre = HookPoint()  # [images, n_features, d_model]
        self.hook_post = HookPoint()  # [images, n_features, d_model]
        self.hook_out = HookPoint()  # [images, n_features, d_model]

    def forward(
        self, x: Float[Tensor, "images n_features d_vision"]
    ) -> Float[Tensor, "images n_features d_model"]:
        x = self.hook_in(x)
        pre = self.hook_pre(F.linear(x, self.in_weight, self.in_bias))
        post = self.hook_post(self.act(pre))
        return self.hook_out(F.linear(post, self.out_weight, self.out_bias))


class LinearProjector(nn.Module):
    """One linear layer with bias from vision to text width (PaliGemma). Hooks: ``hook_in``
    ``[images, n_features, d_vision]``, ``hook_out`` ``[images, n_features, d_model]``."""

    def __init__(self, d_vision: int, d_model: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_model, d_vision))
        self.bias = nn.Parameter(torch.zeros(d_model))
        self.hook_in = HookPoint()  # [images, n_features, d_vision]
        self.hook_out = HookPoint()  # [images, n_features, d_model]

    def forward(
        self, x: Float[Tensor, "images n_features d_vision"]
    ) -> Float[Tensor, "images n_features d_model"]:
        return self.hook_out(F.linear(self.hook_in(x), self.weight, self.bias))
