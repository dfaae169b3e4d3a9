"""Tiny randomly initialised Hugging Face Qwen2-VL / Qwen2.5-VL models and inputs, offline.

Patches are 4 px, merged 2x2 into one token covering 8x8 px; Qwen2.5-VL windows are 16 px
(2x2 tokens) with full attention in vision layer 1.
"""

from __future__ import annotations

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

VOCAB = 120
IMAGE_TOKEN = 110
VIDEO_TOKEN = 111
VISION_START = 112
VISION_END = 113
PATCH = 4
MERGE = 2
TEMPORAL = 2
FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def _text_config(text_layers: int, n_kv_heads: int) -> dict:
    return dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=n_kv_heads, vocab_size=VOCAB,
        max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "mrope_section": [2, 2, 2]},
    )


def tiny_qwen_config(family: str = "qwen2_vl", *, vision_layers: int = 3, text_layers: int = 3,
                     n_kv_heads: int = 2):
    """A tiny ``Qwen2VLConfig`` or ``Qwen2_5_VLConfig`` (d_head 12: M-RoPE sections 2/2/2)."""
    common = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
                  vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    if family == "qwen2_vl":
        vision = dict(depth=vision_layers, embed_dim=32, hidden_size=48, num_heads=4,
                      mlp_ratio=2, patch_size=PATCH, spatial_merge_size=MERGE,
                      temporal_patch_size=TEMPORAL)
        return Qwen2VLConfig(vision_config=vision,
                             text_config=_text_config(text_layers, n_kv_heads), **common)
    if family == "qwen2_5_vl":
        vision = dict(depth=vision_layers, hidden_size=32, intermediate_size=40,
                      out_hidden_size=48, num_heads=4, patch_size=PATCH,
                      spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, window_size=16,
                      fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(vision_config=vision,
                                text_config=_text_config(text_layers, n_kv_heads), **common)
    raise ValueError(f"unknown family {family!r}: use one of {FAMILIES}")


def tiny_qwen(family: str = "qwen2_vl", seed: int = 0, dtype: torch.dtype = torch.float32,
              **kwargs):
    torch.manual_seed(seed)
    config = tiny_qwen_config(family, **kwargs)
    cls = (Qwen2VLForConditionalGeneration if family == "qwen2_vl"
           else Qwen2_5_VLForConditionalGeneration)
    model = cls(config)
    # Random init leaves norms at 1 and biases at 0: perturb every weight so parity is a real test.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.to(dtype).eval()


def tiny_qwen_inputs(grids: list[tuple[int, int]], pad: list[int] | None = None,
                     prefix: int = 3, suffix: int = 5, seed: int = 1) -> dict[str, torch.Tensor]:
    """One image per row with a patch grid ``(rows, cols)`` (even numbers), left padded so rows
    align: ``[prefix, vision_start, image tokens, vision_end, suffix]``."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for h, w in grids:
        n_img = h * w // MERGE**2
        rows.append(torch.cat([
            torch.randint(3, 100, (prefix,), generator=gen), torch.tensor([VISION_START]),
            torch.full((n_img,), IMAGE_TOKEN), torch.tensor([VISION_END]),
            torch.randint(3, 100, (suffix,), generator=gen),
        ]))
    pad = pad or [0] * len(grids)
    width = max(len(r) + p for r, p in zip(rows, pad, strict=True))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    grid_thw = torch.tensor([[1, h, w] for h, w in grids])
    n_patches = int(grid_thw.prod(-1).sum())
    pixel_values = torch.randn(n_patches, 3 * TEMPORAL * PATCH * PATCH, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values,
            "image_grid_thw": grid_thw,
            "mm_token_type_ids": (ids == IMAGE_TOKEN).int()}
