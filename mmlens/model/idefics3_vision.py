"""The Idefics3 / SmolVLM vision transformer and its pixel-shuffle connector.

The tower is SigLIP's (patch convolution with a bias, LayerNorm blocks, no class token) made
for tiles that may be padded: each tile's valid patches (``patch_mask``) are spread over the
square table of learned positions by bucketing their fractional coordinates, and padded patches
are masked out as keys. Unlike LLaVA-OneVision's SigLIP, the final ``post_layernorm`` is applied
(``ln_post``). The connector folds each ``s x s`` square of patches into one token (pixel
shuffle) and projects it to the decoder's width without a bias::

    tiles [n, 3, T, T] ─▶ embed.hook_patch_embed + embed.hook_pos_embed ─▶ hook_embed
        ─▶ blocks.{i}.* ─▶ ln_post ─▶ connector.hook_in [n, (T/p)^2, d]
        ─▶ pixel shuffle ─▶ connector.hook_shuffled [n, (T/p/s)^2, d s^2] ─▶ connector.hook_out
"""

from __future__ import annotations

import torch
from einops import rearrange
from jaxtyping import Bool, Float
from torch import Tensor, nn
from torch.nn import functional as F
from transformer_lens.hook_points import HookPoint

from mmlens.model.components import LayerNorm, VisionBlock
from mmlens.model.config import ShuffleVisionConfig


def bucket_positions(patch_mask: Bool[Tensor, "tiles rows cols"], side: int
                     ) -> Tensor:
    """Indices into the ``side x side`` position table of every patch, as HF computes them:
    a valid patch's fractional coordinate in its tile's valid region, bucketed; padded
    patches take position 0. Returns ``[tiles, rows * cols]``."""
    tiles, rows, cols = patch_mask.shape
    boundaries = torch.arange(1 / side, 1.0, 1 / side, device=patch_mask.device)
    valid_h, valid_w = patch_mask[:, :, 0].sum(1), patch_mask[:, 0, :].sum(1)
    h = torch.arange(rows, device=patch_mask.device, dtype=torch.float32)[None] / valid_h[:, None]
    w = torch.arange(cols, device=patch_mask.device, dtype=torch.float32)[None] / valid_w[:, None]
    h = torch.bucketize(h.clamp(max=1 - 1e-6), boundaries, right=True)
    w = torch.bucketize(w.clamp(max=1 - 1e-6), boundaries, right=True)
    positions = (h[:, :, None] * side + w[:, None, :]).reshape(tiles, -1)
    return torch.where(patch_mask.reshape(tiles, -1), positions, 0)


class BucketedVisionEmbed(nn.Module):
    """``conv(patches) + b_patch + W_pos[bucket(patch)]`` -> ``[tiles, n_patches, d]``.

    Hooks: ``hook_patch_embed`` ``[tiles, n_patches, d]`` (conv output with its bias, row-major),
    ``hook_pos_embed`` ``[tiles, n_patches, d]`` (each patch's looked-up position).
    """

    def __init__(self, cfg: ShuffleVisionConfig):
        super().__init__()
        self.patch_size, self.side = cfg.patch_size, cfg.grid_size
        self.W_patch = nn.Parameter(torch.empty(cfg.d_model, cfg.n_channels, cfg.patch_size,
                                                cfg.patch_size))
        self.b_patch = nn.Parameter(torch.zeros(cfg.d_model))
        self.W_pos = nn.Parameter(torch.empty(cfg.grid_size**2, cfg.d_model))
        self.hook_patch_embed = HookPoint()  # [tiles, n_patches, d_model]
        self.hook_pos_embed = HookPoint()  # [tiles, n_patches, d_model]

    def forward(
        self, pixel_values: Float[Tensor, "tiles channels height width"],
        patch_mask: Bool[Tensor, "tiles rows cols"],
    ) -> Float[Tensor, "tiles n_patches d_model"]:
        pixel_values = pixel_values.to(self.W_patch.dtype)
        patches = F.conv2d(pixel_values, self.W_patch, self.b_patch, stride=self.patch_size)
        patches = self.hook_patch_embed(patches.flatten(2).transpose(1, 2))
        positions = F.embedding(bucket_positions(patch_mask, self.side), self.W_pos)
        return patches + self.hook_pos_embed(positions)


class ShuffleVisionTower(nn.Module):
    """``tiles [n, 3, T, T]`` (+ ``patch_mask [n, T/p, T/p]``) -> ``[n, (T/p)^2, d_vision]``,
    after ``ln_post``. Padded patches are masked as keys in every block (when a tile has any)."""

    def __init__(self, cfg: ShuffleVisionConfig):
        super().__init__()
        self.embed = BucketedVisionEmbed(cfg)
        self.hook_embed = HookPoint()  # [tiles, n_patches, d_vision]
        self.blocks = nn.ModuleList([VisionBlock(cfg) for _ in range(cfg.n_layers)])
        self.ln_post = LayerNorm(cfg.d_model, cfg.eps)

    def forward(
        self, pixel_values: Float[Tensor, "tiles channels height width"],
        patch_mask: Bool[Tensor, "tiles rows cols"],
    ) -> Float[Tensor, "tiles n_patches d_vision"]:
        resid = self.hook_embed(self.embed(pixel_values, patch_mask))
        keys = patch_mask.reshape(len(patch_mask), -1)
        mask = None if bool(keys.all()) else keys[:, None, None, :].expand(
            -1, 1, keys.shape[1], -1)
        for block in self.blocks:
            resid, _ = block(resid, mask=mask)
        return self.ln_post(resid)


class PixelShuffleConnector(nn.Module):
    """``out = shuffle_s(x) W`` : each ``s x s`` square of patches, concatenated row-major
    (HF's ``Idefics3Connector.pixel_shuffle``), projected to the decoder's width; no bias.

    Hooks: ``hook_in`` ``[tiles, n_patches, d_vision]``, ``hook_shuffled``
    ``[tiles, n_tokens, d_vision * s^2]``, ``hook_out`` ``[tiles, n_tokens, d_model]``.
    """

    def __init__(self, cfg: ShuffleVisionConfig, d_model: int):
        super().__init__()
        self.scale = cfg.scale_factor
        self.weight = nn.Parameter(torch.empty(d_model, cfg.d_model * cfg.scale_factor**2))
        self.hook_in = HookPoint()  # [tiles, n_patches, d_vision]
        self.hook_shuffled = HookPoint()  # [tiles, n_tokens, d_vision * s^2]
        self.hook_out = HookPoint()  # [tiles, n_tokens, d_model]

    @property
    def W_in(self) -> Float[Tensor, "d_shuffled d_model"]:
        return self.weight.T

    def forward(self, x: Float[Tensor, "tiles n_patches d_vision"]
                ) -> Float[Tensor, "tiles n_tokens d_model"]:
        x = self.hook_in(x)
        side = int(round(x.shape[1] ** 0.5))
        if side * side != x.shape[1] or side % self.scale:
            raise ValueError(f"the pixel shuffle needs a square grid of patches whose side is a "
                             f"multiple of {self.scale}; got {x.shape[1]} patches")
        # HF's order of the s*s patches' features: row offset, then column offset, then channel
        shuffled = rearrange(x, "n (h a w b) d -> n (h w) (a b d)", h=side // self.scale,
                             a=self.scale, b=self.scale)
        return self.hook_out(F.linear(self.hook_shuffled(shuffled), self.weight))
