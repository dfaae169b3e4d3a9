"""The SigLIP vision tower: patch embedding (no class token), encoder blocks, feature selection.

As for CLIP, only the blocks the selected features need are built. The selected hidden states
are those Hugging Face's ``SiglipVisionModel`` returns in ``hidden_states``: block outputs
*before* ``post_layernorm``, which LLaVA-OneVision never applies to its image features, so the
tower has no final norm and every hook lies on the data path.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from mmlens.model.components import LayerNorm, SiglipVisionEmbed, VisionBlock
from mmlens.model.config import MultimodalConfig


class SiglipVisionTower(nn.Module):
    """``pixel_values [images, 3, H, W] -> features [images, n_features, d_vision * n_used]``.

    Hooks: ``embed.hook_patch_embed``, ``embed.hook_pos_embed``, ``hook_embed`` (patches +
    positions, ``[images, n_patches, d]``), ``blocks.{l}.*`` as on the language side (attention
    is full, not causal). Strategy ``"default"`` drops the first patch feature, as Hugging Face
    does (there is no class token to drop).
    """

    def __init__(self, cfg: MultimodalConfig):
        super().__init__()
        vc = cfg.vision
        self.feature_layers = cfg.feature_layers
        self.drop_first = cfg.feature_select_strategy == "default"
        self.embed = SiglipVisionEmbed(vc.d_model, vc.patch_size, vc.image_size, vc.n_channels)
        self.hook_embed = HookPoint()  # [images, n_patches, d_vision]
        self.blocks = nn.ModuleList([VisionBlock(vc) for _ in range(vc.n_layers)])

    def forward(
        self, pixel_values: Float[Tensor, "images channels height width"]
    ) -> Float[Tensor, "images n_features d_features"]:
        resid = self.hook_embed(self.embed(pixel_values))
        hidden_states = [resid]
        for block in self.blocks:
            resid, _ = block(resid)
            hidden_states.append(resid)
        selected = [hidden_states[i] for i in self.feature_layers]
        if self.drop_first:
            selected = [h[:, 1:] for h in selected]
        return selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)


class SiglipPostNormTower(SiglipVisionTower):
    """The whole SigLIP tower with its ``post_layernorm`` (``ln_post.*``), as Gemma 3 reads it:
    the last block's output, normed. Every block is built (the last hidden state is used)."""

    def __init__(self, cfg: MultimodalConfig):
        super().__init__(cfg)
        self.ln_post = LayerNorm(cfg.vision.d_model, cfg.vision.eps)

    def forward(
        self, pixel_values: Float[Tensor, "images channels height width"]
    ) -> Float[Tensor, "images n_patches d_vision"]:
        return self.ln_post(super().forward(pixel_values))
