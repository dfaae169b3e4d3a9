"""A tiny SmolVLM (``SmolVLMForConditionalGeneration``): Idefics3's tiny network and processor
(``mmlens.zoo.tiny.idefics3``) under SmolVLM's config classes and PIL image processor."""

from __future__ import annotations

from typing import Any

from mmlens.zoo.tiny.idefics3 import (
    CHAT_TEMPLATE,
    IMAGE_SIZES,
    config_fields,
    hf_decoder_layers,
    hf_vision_layers,
    image_processor,
    tokenizer,
    tokens_per_tile,
)

HF_CLASS = "SmolVLMForConditionalGeneration"
__all__ = ["HF_CLASS", "IMAGE_SIZES", "hf_config", "hf_decoder_layers", "hf_vision_layers",
           "processor"]


def hf_config(**overrides: Any) -> Any:
    """The tiny ``SmolVLMConfig`` (fields as Idefics3's tiny config)."""
    from transformers import SmolVLMConfig

    return SmolVLMConfig(**config_fields(dict(overrides)))


def processor(hf_config: Any = None) -> Any:
    """HF's ``Idefics3Processor`` (the text SmolVLM's writes; no video processor, so no
    torchvision) over the tokenizer and SmolVLM's PIL image processor, writing the tokens a
    tile ``hf_config`` makes."""
    from transformers import Idefics3Processor

    return Idefics3Processor(image_processor("SmolVLMImageProcessorPil"), tokenizer(),
                             image_seq_len=tokens_per_tile(hf_config), chat_template=CHAT_TEMPLATE)
