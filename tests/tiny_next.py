"""Tiny LLaVA-NeXT models and processors (``mmlens.zoo.tiny.llava_next``) and their inputs.

Tiles are 32 px with 8 px patches (a 4 x 4 grid a tile); the canvases are 32x64, 64x32 and
64x64 (height x width), so an image gives 1 base tile plus 2 or 4 high-resolution tiles.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

from mmlens.inputs.templates import LLAMA3, VICUNA_V1
from mmlens.zoo.tiny import llava_next as builder
from mmlens.zoo.tiny import tiny_hf_model
from mmlens.zoo.tiny.llava_next import (  # noqa: F401 - re-exported for the tests
    IMAGE_TOKEN,
    LLAMA3_ROPE,
    LLAMA3_SPECIALS,
    PATCH,
    PINPOINTS,
    SPECIALS,
    TILE,
    VOCAB,
)
from mmlens.zoo.tiny.tokenizer import QUESTIONS

tiny_next_config = builder.hf_config
tiny_tokenizer = builder.tokenizer
tiny_image_processor = builder.image_processor


def tiny_next(seed: int = 0, **kwargs) -> LlavaNextForConditionalGeneration:
    """A random LLaVA-NeXT with every weight perturbed, so norms and biases are not trivial."""
    return tiny_hf_model("llava_next", seed=seed, scale=0.02, **kwargs)


def tiny_processor(llama3: bool = False,
                   pinpoints: list[list[int]] | None = None) -> LlavaNextProcessor:
    return builder.processor(tiny_next_config(pinpoints=pinpoints), llama3=llama3)


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def next_inputs(processor: LlavaNextProcessor, sizes: list[tuple[int, int]],
                questions: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Left-padded processor outputs for random images of the given (height, width) sizes."""
    template = LLAMA3 if "<|eot_id|>" in processor.tokenizer.get_vocab() else VICUNA_V1
    questions = questions or [QUESTIONS[i % len(QUESTIONS)] for i in range(len(sizes))]
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    return dict(processor(images=images, text=[template.format(q) for q in questions],
                          padding=True, return_tensors="pt"))
