"""A tiny Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP 32 px / 4 px patches, each 2x2
block pooled into one of 16 image tokens, a 5-layer Gemma 3 decoder with sliding (window 4,
layers 0 and 3) and global layers, each kind with its own rotary base, grouped-query attention
and a word-level tokenizer with Gemma's specials."""

from __future__ import annotations

from typing import Any

from mmlens.core.sizes import ImageSize
from mmlens.zoo.tiny.tokenizer import word_tokenizer

HF_CLASS = "Gemma3ForConditionalGeneration"
IMAGE_SIZES = (ImageSize(37, 29), ImageSize(20, 45), ImageSize(64, 64))

VARIANTS = {  # hf_config overrides the conformance suite checks parity on, beside the default
    "mha-soft-capped": dict(text_config=dict(num_key_value_heads=4, attn_logit_softcapping=20.0,
                                             final_logit_softcapping=15.0)),
    "wide-window-four-tokens": dict(text_config=dict(sliding_window=16, head_dim=16,
                                                     query_pre_attn_scalar=16),
                                    mm_tokens_per_image=4),
    "default-rope-every-layer": dict(text_config=dict(rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1000.0}})),
}
SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_image>", "<end_of_image>",
            "<image_soft_token>", "<start_of_turn>", "<end_of_turn>")
VOCAB = 96
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}"
    "{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def hf_config(**overrides: Any) -> Any:
    """The tiny ``Gemma3Config``; ``overrides`` replace top-level fields, ``text_config`` /
    ``vision_config`` dicts update the towers' fields."""
    from transformers import Gemma3Config

    text = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=5,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12,
        sliding_window=4, max_position_embeddings=256, rms_norm_eps=1e-6,
        layer_types=["sliding_attention", "full_attention", "full_attention",
                     "sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
        pad_token_id=0, eos_token_id=1, bos_token_id=2)
    text.update(overrides.pop("text_config", {}))
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, image_size=32, patch_size=4, vision_use_head=False)
    vision.update(overrides.pop("vision_config", {}))
    fields = dict(text_config=text, vision_config=vision, mm_tokens_per_image=16,
                  boi_token_index=SPECIALS.index("<start_of_image>"),
                  eoi_token_index=SPECIALS.index("<end_of_image>"),
                  image_token_index=SPECIALS.index("<image_soft_token>"),
                  pad_token_id=0, eos_token_id=1, bos_token_id=2)
    fields.update(overrides)
    return Gemma3Config(**fields)


def tokenizer() -> Any:
    """Word-level, Gemma's special tokens first, ``<bos>`` prepended, left padding."""
    return word_tokenizer(
        SPECIALS, ["user model Answer the question using a single word or phrase ."],
        vocab=VOCAB, unk="<unk>", bos="<bos>",
        eos_token="<eos>", pad_token="<pad>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"})


def image_processor(hf_config: Any) -> Any:
    """The PIL image processor (no torchvision) at the tower's size."""
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    size = hf_config.vision_config.image_size
    return Gemma3ImageProcessorPil(size={"height": size, "width": size})


def processor(hf_config: Any) -> Any:
    """The processor ``from_pretrained`` composes for Gemma 3 (``families.gemma3``): prompts
    hold the soft image token once per image, as ``templates.GEMMA3`` writes them."""
    from mmlens.model.families.gemma3 import gemma3_processor

    return gemma3_processor(tokenizer(), image_processor(hf_config), hf_config, CHAT_TEMPLATE)


def hf_processor(hf_config: Any) -> Any:
    """HF's own ``Gemma3Processor`` (prompts hold ``<start_of_image>``; pan-and-scan)."""
    from transformers import Gemma3Processor

    return Gemma3Processor(image_processor=image_processor(hf_config), tokenizer=tokenizer(),
                           chat_template=CHAT_TEMPLATE,
                           image_seq_length=hf_config.mm_tokens_per_image)
