"""The Qwen2-VL / Qwen2.5-VL vision transformer and its patch merger, with hooks.

All images of a call are packed into one sequence ``[1, n_patches, d_vision]`` in the image
processor's order: image by image, and within an image by 2x2 merge block (row-major over
blocks, then row-major inside a block), so that four consecutive patches merge into one token.
Attention stays within an image (Qwen2-VL, and Qwen2.5-VL's full-attention layers) or within
a window of ``window_size`` pixels (Qwen2.5-VL's other layers); both are a boolean
``hook_mask``, so a knockout edit composes with them. Hugging Face runs window layers on a
window-sorted permutation of the patches; attention and per-token layers commute with that
permutation, so the unpermuted order here gives the same numbers, and every hook sees the
processor's order (which ``mmlens.inputs.vision_spans`` maps spans into).

    pixel_values [n_patches, C*T*P*P] ─▶ hook_embed ─▶ blocks.{l}.hook_resid_pre ... hook_resid_post
        ─▶ merger.hook_in ─▶ merger.ln_q ─▶ (4 patches -> 1) ─▶ merger.hook_pre ─▶ GELU
        ─▶ merger.hook_post ─▶ merger.hook_out [1, n_tokens, d_model]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from torch.nn import functional as F
from transformer_lens.hook_points import HookPoint

from mmlens.model.components.attention import Attention
from mmlens.model.components.blocks import _Block
from mmlens.model.components.mlp import GatedMLP, VisionMLP
from mmlens.model.components.norms import LayerNorm, RMSNorm
from mmlens.model.config import QwenVisionConfig


def patch_grid_positions(grid_thw: Int[Tensor, "images 3"], merge_size: int
                         ) -> Int[Tensor, "n_patches 3"]:
    """``(frame, row, col)`` on its image's patch grid of every packed patch, in packed order."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        shape = (h // merge_size, merge_size, w // merge_size, merge_size)
        rows = rows.reshape(shape).transpose(1, 2).flatten()
        cols = cols.reshape(shape).transpose(1, 2).flatten()
        frames = torch.arange(t).repeat_interleave(h * w)
        out.append(torch.stack([frames, rows.repeat(t), cols.repeat(t)], dim=-1))
    return torch.cat(out)


def attention_groups(grid_thw: Int[Tensor, "images 3"], merge_size: int,
                     window: int | None = None) -> Int[Tensor, " n_patches"]:
    """A group id per packed patch: patches attend to their own group only.

    Groups are image frames, or with ``window`` (merged tokens per window side) the windows
    tiling each frame from its top-left corner.
    """
    positions = patch_grid_positions(grid_thw, merge_size)
    groups, offset = [], 0
    start = 0
    for t, h, w in grid_thw.tolist():
        pos = positions[start:start + t * h * w]
        start += t * h * w
        if window is None:
            local = pos[:, 0]
            n_local = t
        else:
            side = window * merge_size  # patches per window side
            n_h, n_w = -(-h // side), -(-w // side)
            local = (pos[:, 0] * n_h + pos[:, 1] // side) * n_w + pos[:, 2] // side
            n_local = t * n_h * n_w
        groups.append(local + offset)
        offset += n_local
    return torch.cat(groups)


def group_mask(groups: Int[Tensor, " n_patches"]) -> Bool[Tensor, "1 1 n_patches n_patches"] | None:
    """The "may attend" mask of ``groups``; None when every patch is in one group."""
    if bool((groups == groups[0]).all()):
        return None
    return (groups[:, None] == groups[None, :])[None, None]


def vision_rotary(positions: Int[Tensor, "n_patches 3"], d_head: int, theta: float,
                  dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """2D rotary tables ``[1, n_patches, 1, d_head]``: a quarter of the frequencies per axis.

    ``emb = [row * f, col * f, row * f, col * f]`` with ``f = theta^(-4i/d_head)``.
    """
    spatial = d_head // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))
    freqs = positions[:, 1:, None].float() * inv_freq.to(positions.device)  # [n, 2, d_head/4]
    freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype)[None, :, None], emb.sin().to(dtype)[None, :, None]


def interpolate_positions(table: Float[Tensor, "side_sq d"], positions: Int[Tensor, "n_patches 3"],
                          grid_thw: Int[Tensor, "images 3"]) -> Float[Tensor, "n_patches d"]:
    """Qwen3-VL's learned positions: the square ``side x side`` table resampled bilinearly
    (corners aligned) to each patch's image grid, as ``F.interpolate(align_corners=True)``.

    A patch at row ``r`` of an ``h``-row grid reads table row ``r (side - 1) / (h - 1)``,
    blending its two neighbours (and likewise for columns); the sum is in float32.
    """
    side = int(table.shape[0] ** 0.5)
    counts = grid_thw.prod(-1)
    sizes = grid_thw[:, 1:].repeat_interleave(counts, dim=0).to(positions.device)

    def taps(index: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
        source = index.float() * (side - 1) / (size - 1).clamp(min=1)
        floor = source.floor()
        frac = source - floor
        low = floor.long().clamp(0, side - 1)
        return torch.stack([low, (low + 1).clamp(max=side - 1)], -1), torch.stack(
            [1 - frac, frac], -1)

    rows, row_w = taps(positions[:, 1], sizes[:, 0])
    cols, col_w = taps(positions[:, 2], sizes[:, 1])
    index = (rows[:, :, None] * side + cols[:, None, :]).flatten(1).to(table.device)
    weight = (row_w[:, :, None] * col_w[:, None, :]).flatten(1).to(table.device)
    return (table[index].float() * weight[..., None]).sum(1)


def _norm(cfg: QwenVisionConfig) -> nn.Module:
    return RMSNorm(cfg.d_model, cfg.eps) if cfg.rms_norm else LayerNorm(cfg.d_model, cfg.eps)


class QwenVisionBlock(_Block):
    """Qwen2-VL: LayerNorm and a quick-GELU MLP; Qwen2.5-VL: RMSNorm and a gated SiLU MLP.

    Attention is bidirectional with biases and 2D rotary positions.
    """

    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()

        mlp = (GatedMLP(cfg.d_model, cfg.d_mlp, cfg.act_fn, bias=True) if cfg.gated_mlp
               else VisionMLP(cfg.d_model, cfg.d_mlp, cfg.act_fn))
        self._register(
            _norm(cfg),
            Attention(cfg.d_model, cfg.n_heads, cfg.d_head, qkv_bias=True, out_bias=True,
                      rotary=True),
            _norm(cfg), mlp,
        )


class PatchMerger(nn.Module):
    """``merge_size**2`` neighbouring patches -> one token in the text width.

    ``out = W_out GELU(W_in concat(ln_q(p_1..p_4)) + b_in) + b_out``; with ``postshuffle_norm``
    (Qwen3-VL's DeepStack mergers) ``ln_q`` normalises the concatenation instead. Hooks: ``hook_in``
    ``[1, n_patches, d_vision]``, ``ln_q.*``, ``hook_pre`` / ``hook_post``
    ``[1, n_tokens, 4 d_vision]``, ``hook_out`` ``[1, n_tokens, d_model]``.
    """

    def __init__(self, cfg: QwenVisionConfig, postshuffle_norm: bool = False):
        super().__init__()
        d_in = cfg.d_model * cfg.merge_size**2
        self.d_in = d_in
        self.postshuffle_norm = postshuffle_norm
        self.hook_in = HookPoint()  # [1, n_patches, d_vision]
        self.ln_q = LayerNorm(d_in, cfg.eps) if postshuffle_norm else _norm(cfg)
        self.in_weight = nn.Parameter(torch.empty(d_in, d_in))
        self.in_bias = nn.Parameter(torch.zeros(d_in))
        self.out_weight = nn.Parameter(torch.empty(cfg.d_out, d_in))
        self.out_bias = nn.Parameter(torch.zeros(cfg.d_out))
        self.hook_pre = HookPoint()  # [1, n_tokens, 4 d_vision]
        self.hook_post = HookPoint()  # [1, n_tokens, 4 d_vision]
        self.hook_out = HookPoint()  # [1, n_tokens, d_model]

    def forward(self, x: Float[Tensor, "1 n_patches d_vision"]
                ) -> Float[Tensor, "1 n_tokens d_model"]:
        x = self.hook_in(x)
        if self.postshuffle_norm:
            grouped = self.ln_q(x.reshape(1, -1, self.d_in))
        else:
            grouped = self.ln_q(x).reshape(1, -1, self.d_in)
        pre = self.hook_pre(F.linear(grouped, self.in_weight, self.in_bias))
        post = self.hook_post(F.gelu(pre))
        return self.hook_out(F.linear(post, self.out_weight, self.out_bias))


class QwenVisionTower(nn.Module):
    """``pixel_values [n_patches, C*T*P*P]`` + ``grid_thw [images, 3]`` -> ``[1, n_patches, d]``.

    Hooks: ``hook_embed`` (the patch embedding, plus the learned positions where the tower has
    them) and ``blocks.{l}.*`` as on the language side. Qwen3-VL's learned positions are
    ``hook_pos_embed`` ``[1, n_patches, d_vision]``: the square table resampled to each image's
    grid (``interpolate_positions``).
    """

    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.W_patch = nn.Parameter(torch.empty(
            cfg.d_model, cfg.n_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size))
        self.b_patch = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.patch_bias else None
        if cfg.n_position_embeddings is not None:
            self.W_pos = nn.Parameter(torch.empty(cfg.n_position_embeddings, cfg.d_model))
            self.hook_pos_embed = HookPoint()  # [1, n_patches, d_vision]
        self.hook_embed = HookPoint()  # [1, n_patches, d_vision]
        self.blocks = nn.ModuleList([QwenVisionBlock(cfg) for _ in range(cfg.n_layers)])

    def forward(
        self, pixel_values: Float[Tensor, "n_patches patch_dim"], grid_thw: Int[Tensor, "images 3"]
    ) -> Float[Tensor, "1 n_patches d_vision"]:
        return self.run(pixel_values, grid_thw)[0]

    def run(
        self, pixel_values: Float[Tensor, "n_patches patch_dim"], grid_thw: Int[Tensor, "images 3"],
        keep: Sequence[int] = (),
    ) -> tuple[Float[Tensor, "1 n_patches d_vision"], list[Tensor]]:
        """The last block's output and, in block order, the outputs of the blocks in ``keep``."""
        cfg = self.cfg
        if pixel_values.ndim != 2 or pixel_values.shape[-1] != cfg.patch_dim:
            raise ValueError(f"pixel_values has shape {list(pixel_values.shape)}; Qwen-VL takes "
                             f"flattened patches [n_patches, {cfg.patch_dim}] with image_grid_thw, "
                             "as its image processor returns them")
        if int(grid_thw.prod(-1).sum()) != pixel_values.shape[0]:
            raise ValueError(f"image_grid_thw {grid_thw.tolist()} describes "
                             f"{int(grid_thw.prod(-1).sum())} patches but pixel_values holds "
                             f"{pixel_values.shape[0]}")
        weight = self.W_patch.reshape(cfg.d_model, -1)
        embed = F.linear(pixel_values.to(weight.dtype), weight, self.b_patch)[None]
        grid_thw = grid_thw.cpu()
        positions = patch_grid_positions(grid_thw, cfg.merge_size)
        if cfg.n_position_embeddings is not None:
            table = interpolate_positions(self.W_pos, positions, grid_thw)
            embed = embed + self.hook_pos_embed(table.to(embed.dtype)[None])
        resid = self.hook_embed(embed)
        rotary = vision_rotary(positions.to(resid.device), cfg.d_head, cfg.rope_theta,
                               resid.dtype)
        full = group_mask(attention_groups(grid_thw, cfg.merge_size))
        windowed = None
        if cfg.full_attention_layers is not None:
            per_side = cfg.window_size // cfg.token_size
            windowed = group_mask(attention_groups(grid_thw, cfg.merge_size, per_side))
        masks = {False: full, True: windowed}
        kept = []
        for layer, block in enumerate(self.blocks):
            mask = masks[cfg.is_windowed(layer)]
            resid, _ = block(resid, mask=None if mask is None else mask.to(resid.device),
                             rotary=rotary)
            if layer in keep:
                kept.append(resid)
        return resid, kept
