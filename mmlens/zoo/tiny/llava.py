"""Tiny LLaVA-1.5: a 3-layer CLIP tower (32 px tiles, 8 px patches: 16 image tokens) and a
3-layer Llama decoder with grouped-query attention; the shapes-llava word tokenizer."""

from __future__ import annotations

from typing import Any

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor

from mmlens.core.sizes import ImageSize

HF_CLASS = "LlavaForConditionalGeneration"
IMAGE_SIZES = (ImageSize(40, 30), ImageSize(29, 45), ImageSize(32, 32))
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
VARIANTS = {  # hf_config overrides the conformance suite checks parity on, beside the default
    "mha-last-layer": dict(n_kv_heads=4, feature_layer=-1),
    "full-strategy": dict(strategy="full"),
    "layer-list": dict(n_kv_heads=1, feature_layer=[-3, -1]),
    "first-layer": dict(feature_layer=1, image_size=48),
    "llama3-rope": dict(rope_parameters=LLAMA3_ROPE),
}
VOCAB = 96
IMAGE_TOKEN = 4  # "<image>" in the shapes-llava vocabulary
PAD_TOKEN = 3


def hf_config(*, n_kv_heads: int = 2, feature_layer: int | list[int] = -2,
              strategy: str = "default", image_size: int = 32, patch_size: int = 8,
              vision_layers: int = 3, text_layers: int = 3, rope_parameters: dict | None = None,
              vocab: int = VOCAB, image_token: int = IMAGE_TOKEN,
              pad_token: int | None = PAD_TOKEN) -> LlavaConfig:
    """A tiny ``LlavaConfig``; ``rope_parameters`` (e.g. Llama-3 scaling) go to the decoder."""
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
        num_attention_heads=4, image_size=image_size, patch_size=patch_size, projection_dim=16,
    )
    text: dict[str, Any] = dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=n_kv_heads, vocab_size=vocab,
        max_position_embeddings=512,
    )
    if pad_token is not None:
        text["pad_token_id"] = pad_token
    if rope_parameters is not None:
        text["rope_parameters"] = rope_parameters
    return LlavaConfig(
        vision_config=vision, text_config=LlamaConfig(**text), image_token_index=image_token,
        vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
    )


def processor(hf_config: LlavaConfig) -> LlavaProcessor:
    """The shapes-llava tokenizer and chat template with CLIP preprocessing at the tower's size."""
    from mmlens.zoo.build import CHAT_TEMPLATE, build_image_processor, build_tokenizer

    vision = hf_config.vision_config
    tokenizer = build_tokenizer()
    if tokenizer.convert_tokens_to_ids("<image>") != hf_config.image_token_id:
        raise ValueError(f"the tiny tokenizer's <image> is id 4, the config's "
                         f"{hf_config.image_token_id}: build the config with image_token=4")
    return LlavaProcessor(
        image_processor=build_image_processor(vision.image_size), tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=hf_config.vision_feature_select_strategy,
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
