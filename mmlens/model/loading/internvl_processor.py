"""InternVL's processor: ``inputs.processor.ComposedProcessor`` with InternVL's image tokens,
composed without a video processor (so without torchvision).

Hugging Face's ``InternVLProcessor`` requires a video processor, and every HF video processor
needs torchvision. Images only need the tokenizer, the GotOcr2 PIL image processor (tiles plus a
thumbnail) and the chat template: each ``<IMG_CONTEXT>`` in a prompt becomes
``<img>`` + ``<IMG_CONTEXT>`` x (``image_seq_length`` x the image's tiles) + ``</img>``, as HF's
processor writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmlens.inputs.processor import ComposedProcessor, load_parts, read_chat_template

IMAGE_TOKEN, START_TOKEN, END_TOKEN = "<IMG_CONTEXT>", "<img>", "</img>"


def internvl_processor(tokenizer: Any, image_processor: Any, image_seq_length: int,
                       chat_template: str | None = None) -> ComposedProcessor:
    """``processor(images=[...], text=[...])`` as HF's ``InternVLProcessor`` does it for images
    (tiles always on, as HF's processor asks the image processor). Returns what HF's does:
    ``input_ids``, ``attention_mask`` and ``pixel_values [tiles, 3, S, S]`` (each image's tile
    count, ``num_patches``, is read back off its image tokens: ``InternVLFamily``)."""
    for token in (START_TOKEN, END_TOKEN):
        if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
            raise ValueError(f"the tokenizer has no {token!r} token: is it the tokenizer of "
                             "this InternVL checkpoint?")

    def count_image_tokens(num_patches: tuple[int, ...]) -> int:
        return image_seq_length * num_patches[0]

    return ComposedProcessor(
        tokenizer, image_processor, count_image_tokens=count_image_tokens,
        chat_template=chat_template or getattr(tokenizer, "chat_template", None),
        image_token=IMAGE_TOKEN, sizes_key="num_patches", image_wrap=(START_TOKEN, END_TOKEN),
        image_kwargs={"crop_to_patches": True}, drop=("num_patches",))


def load_internvl_processor(path: str | Path, image_seq_length: int,
                            **kwargs: Any) -> ComposedProcessor:
    """Tokenizer, GotOcr2 PIL image processor and chat template of a checkpoint folder or hub
    name; raises saying which piece is missing."""
    from transformers import GotOcr2ImageProcessorPil

    tokenizer, image_processor = load_parts(path, GotOcr2ImageProcessorPil, "InternVL", **kwargs)
    return internvl_processor(tokenizer, image_processor, image_seq_length,
                              read_chat_template(str(path), tokenizer))
