"""InternViT, InternVL's vision tower, and InternVL's connector (pixel shuffle, LayerNorm + MLP).

Each tile (``S x S`` pixels) is one row: a class token, the patch embedding (a convolution with
a bias) and learned absolute positions, then encoder blocks with layer scale::

    resid_mid  = resid_pre + lambda_1 * attn(ln1(resid_pre))       (hook_attn_out: scaled)
    resid_post = resid_mid + lambda_2 * mlp(ln2(resid_mid))        (hook_mlp_out: scaled)

``ln1``/``ln2`` are LayerNorm or RMSNorm (``norm_type``). The selected hidden state loses its
class token; its ``g x g`` patch grid is pixel-shuffled into ``g/2 x g/2`` tokens, each the
channels of a 2x2 block of patches (row-major: top-left, top-right, bottom-left, bottom-right),
and projected to text width::

    pixel_values ─▶ vision.embed.* ─▶ vision.hook_embed ─▶ vision.blocks.{i}.* (─▶ vision.ln_post)
        ─▶ projector.hook_in (shuffled) ─▶ projector.ln.* ─▶ projector.hook_pre/post ─▶ hook_out
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn import functional as F
from transformer_lens.hook_points import HookPoint
from transformers.activations import ACT2FN

from mmlens.model.components import Attention, LayerNorm, RMSNorm, VisionMLP
from mmlens.model.components.blocks import _Block
from mmlens.model.config import InternVisionConfig


class InternVisionEmbed(nn.Module):
    """``[cls, conv(patches) + b_patch] + pos`` -> ``[tiles, 1 + n_patches, d]``.

    Hooks: ``hook_patch_embed`` ``[tiles, n_patches, d]`` (row-major grid, with the bias),
    ``hook_pos_embed`` ``[1 + n_patches, d]``.
    """

    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        self.patch_size, self.image_size = cfg.patch_size, cfg.image_size
        self.W_patch = nn.Parameter(torch.empty(cfg.d_model, cfg.n_channels, cfg.patch_size,
                                                cfg.patch_size))
        self.b_patch = nn.Parameter(torch.zeros(cfg.d_model))
        self.class_embed = nn.Parameter(torch.zeros(cfg.d_model))
        self.W_pos = nn.Parameter(torch.empty(cfg.grid**2 + 1, cfg.d_model))
        self.hook_patch_embed = HookPoint()  # [tiles, n_patches, d_model]
        self.hook_pos_embed = HookPoint()  # [1 + n_patches, d_model]

    def forward(
        self, pixel_values: Float[Tensor, "tiles channels height width"]
    ) -> Float[Tensor, "tiles pos d_model"]:
        if tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"InternViT takes {self.image_size}x{self.image_size} tiles, got "
                             f"{tuple(pixel_values.shape[-2:])}: run the checkpoint's processor")
        pixel_values = pixel_values.to(self.W_patch.dtype)
        patches = F.conv2d(pixel_values, self.W_patch, self.b_patch, stride=self.patch_size)
        patches = self.hook_patch_embed(patches.flatten(2).transpose(1, 2))
        cls = self.class_embed.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.hook_pos_embed(self.W_pos)


class InternVisionBlock(_Block):
    """An InternViT layer: pre-norm attention and MLP, each output scaled by a learned vector
    (``ls1``, ``ls2``) before it joins the residual stream."""

    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        norm = (lambda: RMSNorm(cfg.d_model, cfg.eps)) if cfg.rms_norm else (
            lambda: LayerNorm(cfg.d_model, cfg.eps))
        self._register(norm(), Attention(cfg.d_model, cfg.n_heads, cfg.d_head,
                                         qkv_bias=cfg.qkv_bias, out_bias=True),
                       norm(), VisionMLP(cfg.d_model, cfg.d_mlp, cfg.act_fn))
        self.ls1 = nn.Parameter(torch.ones(cfg.d_model))
        self.ls2 = nn.Parameter(torch.ones(cfg.d_model))

    def forward(self, resid_pre: Tensor, **kwargs: object) -> tuple[Tensor, object]:
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out, present = self.attn(self.ln1(resid_pre))
        resid_mid = self.hook_resid_mid(resid_pre + self.hook_attn_out(self.ls1 * attn_out))
        mlp_out = self.hook_mlp_out(self.ls2 * self.mlp(self.ln2(resid_mid)))
        return self.hook_resid_post(resid_mid + mlp_out), present


class InternVisionTower(nn.Module):
    """``pixel_values [tiles, 3, S, S] -> [tiles, 1 + n_patches, d]``: the selected hidden
    state (class token first). Hooks: ``embed.*``, ``hook_embed``, ``blocks.{i}.*``,
    ``ln_post.*`` (only where the features go through the final norm)."""

    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        self.embed = InternVisionEmbed(cfg)
        self.hook_embed = HookPoint()  # [tiles, 1 + n_patches, d_vision]
        self.blocks = nn.ModuleList([InternVisionBlock(cfg) for _ in range(cfg.n_layers)])
        self.ln_post = LayerNorm(cfg.d_model, cfg.eps) if cfg.final_norm else None

    def forward(
        self, pixel_values: Float[Tensor, "tiles channels height width"]
    ) -> Float[Tensor, "tiles pos d_vision"]:
        resid = self.hook_embed(self.embed(pixel_values))
        for block in self.blocks:
            resid, _ = block(resid)
        return resid if self.ln_post is None else self.ln_post(resid)


def pixel_shuffle(features: Float[Tensor, "tiles rows cols d"],
                  scale: float) -> Float[Tensor, "tiles rows_s cols_s d_s"]:
    """HF InternVL's ``pixel_shuffle``, op for op: each output token holds the channels of a
    ``1/scale x 1/scale`` block of patches."""
    n, width, height, channels = features.shape
    features = features.reshape(n, width, int(height * scale), int(channels / scale))
    features = features.permute(0, 2, 1, 3).contiguous()
    features = features.reshape(n, int(height * scale), int(width * scale),
                                int(channels / scale**2))
    return features.permute(0, 2, 1, 3).contiguous()


class ShuffleProjector(nn.Module):
    """Patch features -> image tokens: drop the class token, pixel shuffle, then
    ``act(LayerNorm(x) W_1 + b_1) W_2 + b_2``.

    Hooks: ``hook_in`` ``[tiles, tokens, 4 d_vision]`` (shuffled), ``ln.*``, ``hook_pre`` /
    ``hook_post`` around the activation, ``hook_out`` ``[tiles, tokens, d_model]``.
    """

    def __init__(self, cfg: InternVisionConfig, d_model: int, act_fn: str = "gelu"):
        super().__init__()
        self.scale = cfg.shuffle_scale
        d_in = cfg.d_model * int(1 / cfg.shuffle_scale) ** 2
        self.hook_in = HookPoint()  # [tiles, tokens, d_in]
        self.ln = LayerNorm(d_in, 1e-5)
        self.in_weight = nn.Parameter(torch.empty(d_model, d_in))
        self.in_bias = nn.Parameter(torch.zeros(d_model))
        self.out_weight = nn.Parameter(torch.empty(d_model, d_model))
        self.out_bias = nn.Parameter(torch.zeros(d_model))
        self.act = ACT2FN[act_fn]
        self.hook_pre = HookPoint()  # [tiles, tokens, d_model]
        self.hook_post = HookPoint()  # [tiles, tokens, d_model]
        self.hook_out = HookPoint()  # [tiles, tokens, d_model]

    def forward(
        self, features: Float[Tensor, "tiles pos d_vision"]
    ) -> Float[Tensor, "tiles tokens d_model"]:
        patches = features[:, 1:]
        side = int(patches.shape[1] ** 0.5)
        grid = patches.reshape(patches.shape[0], side, side, -1)
        shuffled = pixel_shuffle(grid, self.scale)
        x = self.hook_in(shuffled.reshape(shuffled.shape[0], -1, shuffled.shape[-1]))
        pre = self.hook_pre(F.linear(self.ln(x), self.in_weight, self.in_bias))
        post = self.hook_post(self.act(pre))
        return self.hook_out(F.linear(post, self.out_weight, self.out_bias))
