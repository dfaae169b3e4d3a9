"""Tiny Qwen2-VL: a 3-layer vision transformer (4 px patches, 2x2 merge, d_model 32 -> 48) and
a 3-layer Qwen2 decoder with M-RoPE; shared pieces in ``_qwen``."""

from __future__ import annotations

from transformers import Qwen2VLConfig

from mmlens.zoo.tiny._qwen import IMAGE_SIZES, MERGE, PATCH, TEMPORAL, processor, text_config
from mmlens.zoo.tiny._qwen import token_ids as _token_ids

HF_CLASS = "Qwen2VLForConditionalGeneration"
__all__ = ["HF_CLASS", "IMAGE_SIZES", "VARIANTS", "hf_config", "processor"]
VARIANTS = {  # hf_config overrides the conformance suite checks parity on, beside the default
    "mha-deeper-text": dict(n_kv_heads=4, text_layers=4, vision_layers=2),
    "mqa": dict(n_kv_heads=1),
}


def hf_config(*, vision_layers: int = 3, text_layers: int = 3,
              n_kv_heads: int = 2) -> Qwen2VLConfig:
    vision = dict(depth=vision_layers, embed_dim=32, hidden_size=48, num_heads=4, mlp_ratio=2,
                  patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)
    return Qwen2VLConfig(vision_config=vision, text_config=text_config(text_layers, n_kv_heads),
                         **_token_ids())
