"""Tiny LLaVA-OneVision: 32 px tiles with 8 px SigLIP patches (a 4 x 4 grid a tile, no class
token) on the canvases 32x64, 64x32, 64x64, 64x96 and 96x64 (height x width); ``anyres_max_2``
caps the unpadded tile features at 2 tiles' worth, so a square image on the 64x64 canvas
(8 x 8) is downscaled to 5 x 5 and a wide one on 64x96 to 4 x 6. A 3-layer Qwen2 decoder with
q/k/v biases; mmlens's composed processor (HF's needs torchvision for its video processor)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from mmlens.core.sizes import ImageSize
from mmlens.zoo.tiny.tokenizer import QUESTIONS, word_tokenizer

HF_CLASS = "LlavaOnevisionForConditionalGeneration"
# wide (kept 4 x 8), square (downscaled), unpadded + downscaled, tall, tiny, elongated
IMAGE_SIZES = (ImageSize(64, 32), ImageSize(64, 64), ImageSize(90, 40), ImageSize(60, 90),
               ImageSize(10, 10), ImageSize(70, 20))
TILE, PATCH = 32, 8
PINPOINTS = [[32, 64], [64, 32], [64, 64], [64, 96], [96, 64]]
ASPECT = "anyres_max_2"
VARIANTS = {  # hf_config overrides the conformance suite checks parity on, beside the default
    "penultimate-mqa": dict(feature_layer=-2, n_kv_heads=1),
    "layer-list-mha": dict(feature_layer=[-3, -1], n_kv_heads=4),
    # as SigLIP's 384-px tiles of 14-px patches: 36-px tiles of 8-px patches (4 x 4, 32 px)
    "tiles-not-whole-patches": dict(tile=36, pinpoints=[[36, 72], [72, 36], [72, 72]]),
}
VOCAB = 128
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
IMAGE_TOKEN = SPECIALS.index("<image>")
VIDEO_TOKEN = SPECIALS.index("<video>")
# The chat template published with the llava-hf OneVision checkpoints: images first, then text.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def hf_config(*, feature_layer: int | list = -1, strategy: str = "full", n_kv_heads: int = 2,
              text_layers: int = 3, vision_layers: int = 3, aspect: str = ASPECT,
              tile: int = TILE, pinpoints: list[list[int]] | None = None) -> LlavaOnevisionConfig:
    """A tiny ``LlavaOnevisionConfig`` (``aspect="anyres"`` for no downscaling)."""
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
        num_attention_heads=4, image_size=tile, patch_size=PATCH, vision_use_head=False,
    )
    text = Qwen2Config(
        hidden_size=48, intermediate_size=96, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=n_kv_heads, vocab_size=VOCAB,
        max_position_embeddings=512, pad_token_id=0, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    return LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
        video_token_index=VIDEO_TOKEN, image_grid_pinpoints=pinpoints or PINPOINTS,
        vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
        vision_aspect_ratio=aspect,
    )


def perturb(model: torch.nn.Module) -> None:
    """HF initialises the decoder's q/k/v biases to zero: give them a real spread."""
    for layer in model.model.language_model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.bias.normal_(0, 0.3)


def tokenizer() -> Any:
    """A word-level tokenizer with Qwen2's chat specials and no BOS token."""
    corpus = [f"user assistant {q} Answer the question using a single word or phrase."
              for q in QUESTIONS]
    return word_tokenizer(
        SPECIALS, corpus, vocab=VOCAB, unk="<|endoftext|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})


def image_processor(pinpoints: list[list[int]] | None = None,
                    tile: int = TILE) -> LlavaOnevisionImageProcessorPil:
    return LlavaOnevisionImageProcessorPil(
        size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints or PINPOINTS,
    )


def processor(hf_config: LlavaOnevisionConfig) -> Any:
    """mmlens's composed processor, checked against the model config."""
    from mmlens.model.families.onevision import onevision_config, onevision_processor

    return onevision_processor(
        tokenizer(), image_processor(hf_config.image_grid_pinpoints,
                                     hf_config.vision_config.image_size),
        onevision_config(hf_config), CHAT_TEMPLATE)
