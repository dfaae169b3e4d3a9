"""Llama-3.2-Vision's (Mllama's) tiled vision encoder, every step hooked.

Each image arrives as up to ``max_tiles`` square tiles and an aspect-ratio id (which tiles
are real). Per tile: patches, a gated aspect-ratio embedding, a class token, gated positions
(one table for all tiles, one per aspect ratio and tile); then a local transformer over all
tiles of the image at once, a gated aspect-ratio embedding, a global transformer with gated
layers; the output is the global result and, after it, chosen local layers' outputs
(interleaved channel by channel, as HF stacks them)::

    pixel_values ─▶ hook_patch_embed ─▶ pre_tile.* ─▶ (+ class) ─▶ pos.* ─▶ hook_embed ─▶ ln_pre
        ─▶ blocks.{i}.* (local) ─▶ ln_post ─▶ post_tile.* ─▶ global_blocks.{i}.* ─▶ hook_out

Each tile's rows are padded with zeros to a multiple of 8, as HF does; HF's mask blocks only
pairs of padding rows (a padding row or a row of a padded tile sees real rows, and real rows
see every row), and the padding is dropped from the output.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.nn import functional as F
from transformer_lens.hook_points import HookPoint

from mmlens.model.components.attention import Attention
from mmlens.model.components.blocks import _Block
from mmlens.model.components.mlp import VisionMLP
from mmlens.model.components.norms import LayerNorm
from mmlens.model.config import MllamaVisionConfig


class GatedVisionBlock(_Block):
    """An Mllama vision layer: LayerNorm, attention without biases, LayerNorm, GELU MLP; in
    the global transformer each branch is scaled by ``tanh`` of its gate (``hook_attn_gate``,
    ``hook_mlp_gate``, the scale itself) before it joins the residual stream."""

    def __init__(self, cfg: MllamaVisionConfig, gated: bool):
        super().__init__()
        self._register(
            LayerNorm(cfg.d_model, cfg.eps),
            Attention(cfg.d_model, cfg.n_heads, cfg.d_head),
            LayerNorm(cfg.d_model, cfg.eps),
            VisionMLP(cfg.d_model, cfg.d_mlp, cfg.act_fn),
        )
        self.gated = gated
        if gated:
            self.attn_gate = nn.Parameter(torch.zeros(1))
            self.mlp_gate = nn.Parameter(torch.zeros(1))
            self.hook_attn_gate = HookPoint()  # [1]
            self.hook_mlp_gate = HookPoint()  # [1]

    def forward(self, resid_pre: Tensor, *, mask: Tensor | None = None,  # type: ignore[override]
                **_: object) -> tuple[Tensor, None]:
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.attn(self.ln1(resid_pre), mask=mask)[0]
        if self.gated:
            attn_out = self.hook_attn_gate(self.attn_gate.tanh()) * attn_out
        resid_mid = self.hook_resid_mid(resid_pre + self.hook_attn_out(attn_out))
        mlp_out = self.mlp(self.ln2(resid_mid))
        if self.gated:
            mlp_out = self.hook_mlp_gate(self.mlp_gate.tanh()) * mlp_out
        return self.hook_resid_post(resid_mid + self.hook_mlp_out(mlp_out)), None


class AspectRatioEmbedding(nn.Module):
    """One learned vector per tile and aspect ratio, scaled by ``tanh(gate)``
    (``hook_embed``: what is added, ``[images, tiles, 1, d_model]``)."""

    def __init__(self, cfg: MllamaVisionConfig):
        super().__init__()
        self.max_tiles, self.d_model = cfg.max_tiles, cfg.d_model
        self.W = nn.Parameter(torch.empty(len(cfg.supported_aspect_ratios) + 1,
                                          cfg.max_tiles * cfg.d_model))
        self.gate = nn.Parameter(torch.zeros(1))
        self.hook_embed = HookPoint()

    def forward(self, x: Tensor, aspect_ratio_ids: Tensor) -> Tensor:
        added = self.W[aspect_ratio_ids].reshape(-1, self.max_tiles, 1, self.d_model)
        return x + self.hook_embed(added * self.gate.tanh())


class GatedPositionEmbedding(nn.Module):
    """``(1 - tanh(gate))`` times one position table shared by the tiles plus ``tanh(gate)``
    times a table per aspect ratio and tile (``hook_embed``: their sum)."""

    def __init__(self, cfg: MllamaVisionConfig):
        super().__init__()
        self.shape = (cfg.max_tiles, cfg.n_tokens, cfg.d_model)
        self.gate = nn.Parameter(torch.zeros(1))
        self.W_pos = nn.Parameter(torch.empty(cfg.n_tokens, cfg.d_model))
        self.W_tile = nn.Parameter(torch.empty(len(cfg.supported_aspect_ratios) + 1,
                                               math.prod(self.shape)))
        self.hook_embed = HookPoint()  # [images, tiles, tokens, d_model]

    def forward(self, x: Tensor, aspect_ratio_ids: Tensor) -> Tensor:
        x = x + (1 - self.gate.tanh()) * self.W_pos.view(1, 1, *self.shape[1:])
        tile = self.W_tile[aspect_ratio_ids].reshape(-1, *self.shape)
        return x + self.hook_embed(self.gate.tanh() * tile)


class MllamaVisionTower(nn.Module):
    """Tiles -> ``[images, tiles, tokens, d_out]`` (tokens = class token + patches)."""

    def __init__(self, cfg: MllamaVisionConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.W_patch = nn.Parameter(torch.empty(d, cfg.n_channels, cfg.patch_size,
                                                cfg.patch_size))
        self.hook_patch_embed = HookPoint()  # [images, tiles, patches, d_model]
        self.pre_tile = AspectRatioEmbedding(cfg)
        self.class_embed = nn.Parameter(torch.empty(d))
        self.pos = GatedPositionEmbedding(cfg)
        self.hook_embed = HookPoint()  # [images, tiles, tokens, d_model]
        self.ln_pre = LayerNorm(d, cfg.eps)
        self.blocks = nn.ModuleList([GatedVisionBlock(cfg, False) for _ in range(cfg.n_layers)])
        self.ln_post = LayerNorm(d, cfg.eps)
        self.post_tile = AspectRatioEmbedding(cfg)
        self.global_blocks = nn.ModuleList([GatedVisionBlock(cfg, True)
                                            for _ in range(cfg.n_global_layers)])
        self.hook_out = HookPoint()  # [images, tiles, tokens, d_out]

    def tile_mask(self, aspect_ratio_ids: Int[Tensor, " images"]) -> Tensor:
        """HF's ``aspect_ratio_mask``: the real tiles, and always the first."""
        tiles = torch.arange(self.cfg.max_tiles, device=aspect_ratio_ids.device)
        real = tiles[None] < self.cfg.n_tiles(aspect_ratio_ids)[:, None]
        return real | (tiles[None] == 0)

    def attention_mask(self, tile_mask: Tensor) -> Tensor:
        """``[images, 1, rows, rows]``, True = may attend: every pair but two padding rows."""
        cfg = self.cfg
        real_row = torch.arange(cfg.n_padded, device=tile_mask.device) < cfg.n_tokens
        pad = ~(tile_mask[:, :, None] & real_row[None, None]).flatten(1)
        return ~(pad[:, None, :, None] & pad[:, None, None, :])

    def forward(
        self, pixel_values: Float[Tensor, "images tiles channels height width"],
        aspect_ratio_ids: Int[Tensor, " images"],
    ) -> Float[Tensor, "images tiles tokens d_out"]:
        cfg = self.cfg
        images, tiles = pixel_values.shape[:2]
        x = F.conv2d(pixel_values.flatten(0, 1).to(self.W_patch.dtype), self.W_patch,
                     stride=cfg.patch_size)
        x = self.hook_patch_embed(x.flatten(2).transpose(1, 2).reshape(images, tiles, -1,
                                                                        cfg.d_model))
        x = self.pre_tile(x, aspect_ratio_ids)
        cls = self.class_embed.expand(images, tiles, 1, cfg.d_model)
        x = self.hook_embed(self.pos(torch.cat([cls, x], dim=2), aspect_ratio_ids))
        x = F.pad(self.ln_pre(x), (0, 0, 0, cfg.n_padded - cfg.n_tokens))
        mask = self.attention_mask(self.tile_mask(aspect_ratio_ids))
        x = x.reshape(images, -1, cfg.d_model)
        kept = {}
        for layer, block in enumerate(self.blocks):
            x = block(x, mask=mask)[0]
            if layer in cfg.intermediate_layers:
                kept[layer] = x
        # HF stacks the chosen layers on a last axis: channel-major, layer-minor
        intermediate = torch.stack([kept[i] for i in cfg.intermediate_layers], dim=-1)
        x = self.post_tile(self.ln_post(x).view(images, tiles, cfg.n_padded, -1),
                           aspect_ratio_ids)
        x = x.reshape(images, -1, cfg.d_model)
        for block in self.global_blocks:
            x = block(x, mask=mask)[0]
        out = torch.cat([x, intermediate.flatten(-2)], dim=-1).view(images, tiles, cfg.n_padded,
                                                                    -1)
        return self.hook_out(out[:, :, :cfg.n_tokens])


class LinearProjector(nn.Module):
    """One linear layer from the vision output to the text width (``hook_out``)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.bias = nn.Parameter(torch.zeros(d_out))
        self.hook_out = HookPoint()  # [*, d_out]

    def forward(self, x: Tensor) -> Tensor:
        return self.hook_out(F.linear(x.to(self.weight.dtype), self.weight, self.bias))
