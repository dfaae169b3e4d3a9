"""Tiny LLaVA-NeXT: 32 px tiles with 8 px patches (a 4 x 4 grid a tile) on the canvases 32x64,
64x32 and 64x64 (height x width), so an image gives 1 base tile plus 2 or 4 high-resolution
tiles; a 3-layer Llama decoder (Vicuna template, or Llama-3's with ``llama3=True``)."""

from __future__ import annotations

from typing import Any

from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)

from mmlens.core.sizes import ImageSize
from mmlens.inputs.templates import LLAMA3, VICUNA_V1
from mmlens.zoo.tiny.tokenizer import QUESTIONS, word_tokenizer

HF_CLASS = "LlavaNextForConditionalGeneration"
# portrait, landscape, square, smaller than a tile, large, elongated
IMAGE_SIZES = (ImageSize(40, 90), ImageSize(90, 40), ImageSize(64, 64), ImageSize(20, 20),
               ImageSize(100, 150), ImageSize(200, 30))
TILE, PATCH = 32, 8
PINPOINTS = [[32, 64], [64, 32], [64, 64]]
VOCAB = 128
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
IMAGE_TOKEN = SPECIALS.index("<image>")
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
VARIANTS = {  # hf_config overrides the conformance suite checks parity on, beside the default
    "llama3": dict(rope_parameters=LLAMA3_ROPE, n_kv_heads=1),  # and the Llama-3 vocabulary
    "feature-layers": dict(feature_layer=[-3, -1], n_kv_heads=4),
}


def hf_config(*, pinpoints: list[list[int]] | None = None, feature_layer: int | list = -2,
              strategy: str = "default", n_kv_heads: int = 2, text_layers: int = 3,
              rope_parameters: dict | None = None) -> LlavaNextConfig:
    """A tiny ``LlavaNextConfig`` (pass ``rope_parameters=LLAMA3_ROPE`` for LLaMA-3 scaling)."""
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=TILE, patch_size=PATCH, projection_dim=16,
    )
    text: dict[str, Any] = dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=n_kv_heads, vocab_size=VOCAB,
        max_position_embeddings=512, pad_token_id=SPECIALS.index("<pad>"),
    )
    if rope_parameters is not None:
        text["rope_parameters"] = rope_parameters
    return LlavaNextConfig(
        vision_config=vision, text_config=LlamaConfig(**text),
        image_token_index=IMAGE_TOKEN, image_grid_pinpoints=pinpoints or PINPOINTS,
        vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
    )


def tokenizer(llama3: bool = False) -> Any:
    """A word-level tokenizer trained on the prompt template (Vicuna or Llama-3) and questions."""
    template = LLAMA3 if llama3 else VICUNA_V1
    corpus = [template.text.replace("<image>", "").replace("{question}", q) for q in QUESTIONS]
    return word_tokenizer(
        SPECIALS + (LLAMA3_SPECIALS if llama3 else []), corpus, vocab=VOCAB, unk="<unk>",
        bos="<|begin_of_text|>" if llama3 else "<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"})


def image_processor(pinpoints: list[list[int]] | None = None) -> LlavaNextImageProcessorPil:
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
        image_grid_pinpoints=pinpoints or PINPOINTS,
    )


def processor(hf_config: LlavaNextConfig, llama3: bool | None = None) -> LlavaNextProcessor:
    """HF's processor; the Llama-3 vocabulary when the decoder uses Llama-3 rope scaling (or
    ``llama3=True``)."""
    if llama3 is None:
        rope = getattr(hf_config.text_config, "rope_parameters", None) or {}
        llama3 = rope.get("rope_type") == "llama3"
    return LlavaNextProcessor(
        image_processor=image_processor(hf_config.image_grid_pinpoints),
        tokenizer=tokenizer(llama3), patch_size=PATCH,
        vision_feature_select_strategy=hf_config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )
