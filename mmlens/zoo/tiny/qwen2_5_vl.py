"""Tiny Qwen2.5-VL: Qwen2-VL's tiny shapes with RMSNorm and gated MLPs in the vision tower,
16 px attention windows (2x2 tokens) and full attention in vision layer 1."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from transformers import Qwen2_5_VLConfig

from mmlens.zoo.tiny._qwen import IMAGE_SIZES, MERGE, PATCH, TEMPORAL, processor, text_config
from mmlens.zoo.tiny._qwen import token_ids as _token_ids

HF_CLASS = "Qwen2_5_VLForConditionalGeneration"
__all__ = ["HF_CLASS", "IMAGE_SIZES", "VARIANTS", "hf_config", "hf_vision_rows", "processor"]
VARIANTS = {  # hf_config overrides the conformance suite checks parity on, beside the default
    "mha-deeper-text": dict(n_kv_heads=4, text_layers=4, vision_layers=4),
    "mqa": dict(n_kv_heads=1),
}


def hf_config(*, vision_layers: int = 3, text_layers: int = 3,
              n_kv_heads: int = 2) -> Qwen2_5_VLConfig:
    vision = dict(depth=vision_layers, hidden_size=32, intermediate_size=40, out_hidden_size=48,
                  num_heads=4, patch_size=PATCH, spatial_merge_size=MERGE,
                  temporal_patch_size=TEMPORAL, window_size=16, fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(vision_config=vision,
                            text_config=text_config(text_layers, n_kv_heads), **_token_ids())


def hf_vision_rows(hf: Any, inputs: Mapping[str, Any]) -> Tensor:
    """Which of our vision rows (the processor's patch order) each row of HF's vision blocks
    holds: HF runs the blocks on the patches regrouped by attention window."""
    visual = hf.model.visual
    if hasattr(visual, "get_window_index"):  # transformers before the shared vision_utils
        window_index, _ = visual.get_window_index(inputs["image_grid_thw"])
    else:
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(
            inputs["image_grid_thw"], spatial_merge_size=visual.spatial_merge_size,
            window_size=visual.window_size, patch_size=visual.patch_size)
    unit = MERGE**2
    return (window_index[:, None] * unit + torch.arange(unit)).flatten()
