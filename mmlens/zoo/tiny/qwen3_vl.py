"""A tiny Qwen3-VL (``Qwen3VLForConditionalGeneration``): a 3-layer vision transformer (4 px
patches merged 2x2 into 8 px tokens, a 4x4 table of learned positions resampled to every grid,
DeepStack from vision blocks 0 and 1 into decoder blocks 0 and 1) and a 3-layer Qwen3 decoder
(grouped-query attention, per-head q/k RMSNorm, interleaved M-RoPE over a 16-wide head); a
word-level tokenizer with Qwen's specials and the shapes dataset's words."""

from __future__ import annotations

from typing import Any

from mmlens.core.sizes import ImageSize
from mmlens.zoo.tiny.tokenizer import word_tokenizer

HF_CLASS = "Qwen3VLForConditionalGeneration"
IMAGE_SIZES = (ImageSize(45, 29), ImageSize(22, 38), ImageSize(40, 40))

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>",
            "<|vision_start|>", "<|vision_end|>", "<unk>")
VOCAB = 128
PATCH = 4
MERGE = 2
TEMPORAL = 2
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen3-VL's chat template for images and text (no default system prompt)."""
VARIANTS = {  # hf_config overrides the conformance suite checks parity on, beside the default
    "mha-one-deepstack": dict(text_config=dict(num_key_value_heads=4),
                              vision_config=dict(deepstack_visual_indexes=[1])),
    "deeper-text": dict(text_config=dict(num_hidden_layers=5)),
}


def hf_config(**overrides: Any) -> Any:
    """The tiny ``Qwen3VLConfig``; ``overrides`` replace top-level fields, ``text_config`` /
    ``vision_config`` dicts update the towers' fields."""
    from transformers import Qwen3VLConfig

    vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4,
                  out_hidden_size=48, patch_size=PATCH, spatial_merge_size=MERGE,
                  temporal_patch_size=TEMPORAL, num_position_embeddings=16,
                  deepstack_visual_indexes=[0, 1])
    vision.update(overrides.pop("vision_config", {}))
    text = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB,
                max_position_embeddings=512, rms_norm_eps=1e-6, pad_token_id=0,
                eos_token_id=SPECIALS.index("<|im_end|>"),
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    text.update(overrides.pop("text_config", {}))
    fields = dict(vision_config=vision, text_config=text,
                  image_token_id=SPECIALS.index("<|image_pad|>"),
                  video_token_id=SPECIALS.index("<|video_pad|>"),
                  vision_start_token_id=SPECIALS.index("<|vision_start|>"),
                  vision_end_token_id=SPECIALS.index("<|vision_end|>"))
    fields.update(overrides)
    return Qwen3VLConfig(**fields)


def tokenizer() -> Any:
    """Word-level, Qwen's special tokens first (their ids are the config's), left padding."""
    from mmlens.zoo.build import SPECIAL_TOKENS, vocabulary

    words = [w for w in vocabulary() if w not in SPECIAL_TOKENS]
    corpus = [" ".join(words), "system You are a helpful assistant user single phrase using or"]
    return word_tokenizer(SPECIALS, corpus, vocab=VOCAB, unk="<unk>", eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", model_max_length=4096,
                          chat_template=CHAT_TEMPLATE)


def processor(hf_config: Any = None, *, min_pixels: int = 8 * 8 * 4,
              max_pixels: int = 8 * 8 * 64) -> Any:
    """The tokenizer and Qwen's PIL image processor at the tiny sizes, composed without a
    video processor (``mmlens.model.loading.qwen_processor``)."""
    from transformers import Qwen2VLImageProcessorPil

    from mmlens.model.loading.qwen_processor import qwen_processor

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL,
        min_pixels=min_pixels, max_pixels=max_pixels, image_mean=[0.5] * 3,
        image_std=[0.5] * 3)
    return qwen_processor(tokenizer(), image_processor, CHAT_TEMPLATE)


def hf_vision_layers(hf: Any) -> list:
    """HF's vision blocks (the tower also holds the DeepStack mergers' list)."""
    return list(hf.model.visual.blocks)
