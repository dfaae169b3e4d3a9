"""Tiny randomly initialised Hugging Face Qwen2-VL / Qwen2.5-VL models and inputs, offline.

Patches are 4 px, merged 2x2 into one token covering 8x8 px; Qwen2.5-VL windows are 16 px
(2x2 tokens) with full attention in vision layer 1.
"""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

from mmlens.zoo.tiny import _qwen, qwen2_5_vl, qwen2_vl, tiny_hf_model
from mmlens.zoo.tiny._qwen import (  # noqa: F401 - re-exported for the tests
    IMAGE_TOKEN,
    MERGE,
    PATCH,
    SPECIALS,
    TEMPORAL,
    VIDEO_TOKEN,
    VISION_END,
    VISION_START,
    VOCAB,
)

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
_BUILDERS = {"qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_5_vl}


def tiny_qwen_config(family: str = "qwen2_vl", **kwargs):
    """A tiny ``Qwen2VLConfig`` or ``Qwen2_5_VLConfig`` (d_head 12: M-RoPE sections 2/2/2)."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}: use one of {FAMILIES}")
    return _BUILDERS[family].hf_config(**kwargs)


def tiny_qwen(family: str = "qwen2_vl", seed: int = 0, dtype: torch.dtype = torch.float32,
              **kwargs) -> Qwen2VLForConditionalGeneration | Qwen2_5_VLForConditionalGeneration:
    tiny_qwen_config(family)  # the family check
    return tiny_hf_model(family, seed=seed, dtype=dtype, scale=0.05, **kwargs)


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


QWEN_CHAT_TEMPLATE = _qwen.CHAT_TEMPLATE
tiny_qwen_tokenizer = _qwen.tokenizer


def tiny_qwen_processor(min_pixels: int = 8 * 8 * 4, max_pixels: int = 8 * 8 * 64):
    """Tokenizer + Qwen's PIL image processor at the tiny patch sizes (4 px, 2x2 merge)."""
    return _qwen.processor(min_pixels=min_pixels, max_pixels=max_pixels)
