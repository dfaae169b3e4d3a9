"""Token embedding, unembedding, and CLIP's patch + class + position embedding."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.nn import functional as F
from transformer_lens.hook_points import HookPoint


class Embed(nn.Module):
    """``W_E[tokens]``: ``[batch, pos] -> [batch, pos, d_model]``."""

    def __init__(self, d_vocab: int, d_model: int):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(d_vocab, d_model))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return F.embedding(tokens, self.W_E)


class Unembed(nn.Module):
    """``logits = x W_U``; stored as ``[d_vocab, d_model]``, ``W_U`` is the transposed view."""

    def __init__(self, d_model: int, d_vocab: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_vocab, d_model))

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.weight.T

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        return self.weight.new_zeros(self.weight.shape[0])

    def forward(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_vocab"]:
        return F.linear(x, self.weight)


class VisionEmbed(nn.Module):
    """CLIP embedding: ``[cls, conv(patches)] + pos_embed`` -> ``[images, 1 + n_patches, d]``.

    Hooks: ``hook_patch_embed`` ``[images, n_patches, d]`` (conv output, row-major grid),
    ``hook_pos_embed`` ``[1 + n_patches, d]``.
    """

    def __init__(self, d_model: int, patch_size: int, image_size: int, n_channels: int = 3):
        super().__init__()
        n_patches = (image_size // patch_size) ** 2
        self.patch_size = patch_size
        self.W_patch = nn.Parameter(torch.empty(d_model, n_channels, patch_size, patch_size))
        self.class_embed = nn.Parameter(torch.empty(d_model))
        self.W_pos = nn.Parameter(torch.empty(n_patches + 1, d_model))
        self.hook_patch_embed = HookPoint()  # [images, n_patches, d_model]
        self.hook_pos_embed = HookPoint()  # [1 + n_patches, d_model]

    def forward(
        self, pixel_values: Float[Tensor, "images channels height width"]
    ) -> Float[Tensor, "images pos d_model"]:
        pixel_values = pixel_values.to(self.W_patch.dtype)
        patches = F.conv2d(pixel_values, self.W_patch, stride=self.patch_size)
        patches = self.hook_patch_embed(patches.flatten(2).transpose(1, 2))
        cls = self.class_embed.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.hook_pos_embed(self.W_pos)
