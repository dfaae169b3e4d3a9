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


QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The chat template Qwen2-VL and Qwen2.5-VL checkpoints ship."""

SPECIALS = {"<|endoftext|>": 100, "<|im_start|>": 101, "<|im_end|>": 102,
            "<|image_pad|>": IMAGE_TOKEN, "<|video_pad|>": VIDEO_TOKEN,
            "<|vision_start|>": VISION_START, "<|vision_end|>": VISION_END}


def tiny_qwen_tokenizer():
    """A word-level tokenizer with Qwen's special tokens at the tiny configs' ids; it knows the
    chat template's words and the shapes dataset's questions and answers."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mmlens.zoo.build import SPECIAL_TOKENS, WORD_PATTERN, vocabulary

    words = [w for w in vocabulary() if w not in SPECIAL_TOKENS]
    words += ["<unk>", "system", "You", "are", "user", "single", "phrase", "using", "or"]
    words = list(dict.fromkeys(words))
    assert len(words) <= 100, len(words)
    vocab = {w: i for i, w in enumerate(words)}
    vocab |= {f"<unused{i}>": i for i in range(len(words), VOCAB) if i not in SPECIALS.values()}
    vocab |= SPECIALS
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed",
                                                   invert=True)
    tokenizer.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", padding_side="left", model_max_length=4096,
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def tiny_qwen_processor(min_pixels: int = 8 * 8 * 4, max_pixels: int = 8 * 8 * 64):
    """Tokenizer + Qwen's PIL image processor at the tiny patch sizes (4 px, 2x2 merge)."""
    from transformers import Qwen2VLImageProcessorPil

    from mmlens.model.loading.qwen_processor import qwen_processor

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL,
        min_pixels=min_pixels, max_pixels=max_pixels)
    return qwen_processor(tiny_qwen_tokenizer(), image_processor)
