"""Qwen-VL's processor: ``inputs.processor.ComposedProcessor`` with Qwen's image token and
token count, composed without a video processor (so without torchvision).

Hugging Face's ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` require a video processor, and
every HF video processor needs torchvision. Images only need the tokenizer, the PIL image
processor class and the chat template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmlens.inputs.processor import ComposedProcessor, load_parts, read_chat_template

IMAGE_TOKEN = "<|image_pad|>"


def qwen_processor(tokenizer: Any, image_processor: Any,
                   chat_template: str | None = None) -> ComposedProcessor:
    """``processor(images=[...], text=[...])`` as HF's Qwen-VL processor does it for images.

    Each ``<|image_pad|>`` in a text becomes ``t * h * w / merge_size**2`` copies (one per
    merged token of its image, images taken in order). Returns ``input_ids``,
    ``attention_mask``, ``pixel_values [n_patches, C*T*P*P]``, ``image_grid_thw [images, 3]``
    and ``mm_token_type_ids``.
    """
    merge = image_processor.merge_size**2

    def count_image_tokens(grid_thw: tuple[int, ...]) -> int:
        t, h, w = grid_thw
        return t * h * w // merge

    return ComposedProcessor(
        tokenizer, image_processor, count_image_tokens=count_image_tokens,
        chat_template=chat_template or getattr(tokenizer, "chat_template", None),
        image_token=getattr(tokenizer, "image_token", None) or IMAGE_TOKEN,
        sizes_key="image_grid_thw", mm_token_type_ids=True)


def load_qwen_processor(path: str | Path, **kwargs: Any) -> ComposedProcessor:
    """Tokenizer, PIL image processor and chat template of a checkpoint folder or hub name.

    Raises when the tokenizer or the image processor cannot be loaded: the model is then
    unusable for ``prepare``, and the error says which piece is missing.
    """
    from transformers import Qwen2VLImageProcessorPil

    tokenizer, image_processor = load_parts(path, Qwen2VLImageProcessorPil, "Qwen-VL", **kwargs)
    return qwen_processor(tokenizer, image_processor, read_chat_template(str(path), tokenizer))
