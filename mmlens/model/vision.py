"""The CLIP vision tower: patch embedding, pre-norm, encoder blocks, feature selection.

Only the blocks whose output the selected features need are built (for LLaVA's penultimate
layer, all but the last), so every vision hook lies on the data path.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from mmlens.model.components import LayerNorm, VisionBlock, VisionEmbed
from mmlens.model.config import MultimodalConfig


class VisionTower(nn.Module):
    """``pixel_values [images, 3, H, W] -> features [images, n_features, d_vision * n_used]``.

    Hooks: ``embed.hook_patch_embed``, ``embed.hook_pos_embed``, ``hook_embed`` (class + patches
    + positions, ``[images, 1 + n_patches, d]``), ``ln_pre.*``, ``blocks.{l}.*`` as on the
    language side (attention is full, not causal).
    """

    def __init__(self, cfg: MultimodalConfig):
        super().__init__()
        vc = cfg.vision
        self.feature_layers = cfg.feature_layers
        self.drop_cls = cfg.feature_select_strategy == "default"
        self.embed = VisionEmbed(vc.d_model, vc.patch_size, vc.image_size, vc.n_channels)
        self.hook_embed = HookPoint()  # [images, 1 + n_patches, d_vision]
        self.ln_pre = LayerNorm(vc.d_model, vc.eps)
        self.blocks = nn.ModuleList([VisionBlock(vc) for _ in range(vc.n_layers)])

    def forward(
        self, pixel_values: Float[Tensor, "images channels height width"]
    ) -> Float[Tensor, "images n_features d_features"]:
        resid = self.ln_pre(self.hook_embed(self.embed(pixel_values)))
        hidden_states = [resid]
        for block in self.blocks:
            resid, _ = block(resid)
            hidden_states.append(resid)
        selected = [hidden_states[i] for i in self.feature_layers]
        if self.drop_cls:
            selected = [h[:, 1:] for h in selected]
        return selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)
