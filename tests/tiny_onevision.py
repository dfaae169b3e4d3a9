"""Tiny LLaVA-OneVision models and processors (``mmlens.zoo.tiny.llava_onevision``) and inputs.

Tiles are 32 px with 8 px SigLIP patches (a 4 x 4 grid a tile, 16 features). The canvases
(height x width) are 32x64, 64x32, 64x64, 64x96 and 96x64, and ``anyres_max_2`` caps the
unpadded tile features at 2 tiles' worth: a 32x64 canvas (4 x 8 = 32 features) is kept as is,
a square image on the 64x64 canvas (8 x 8) is downscaled to 5 x 5, a wide one on 64x96 to 4 x 6.
"""

from __future__ import annotations

import torch
from tiny_next import random_image
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

from mmlens.zoo.tiny import llava_onevision as builder
from mmlens.zoo.tiny import tiny_hf_model
from mmlens.zoo.tiny.llava_onevision import (  # noqa: F401 - re-exported for the tests
    ASPECT,
    CHAT_TEMPLATE,
    IMAGE_TOKEN,
    PATCH,
    PINPOINTS,
    SPECIALS,
    TILE,
    VIDEO_TOKEN,
    VOCAB,
)
from mmlens.zoo.tiny.tokenizer import QUESTIONS

__all__ = ["random_image"]

tiny_onevision_config = builder.hf_config
tiny_tokenizer = builder.tokenizer
tiny_image_processor = builder.image_processor


def tiny_onevision(seed: int = 0, **kwargs) -> LlavaOnevisionForConditionalGeneration:
    """A random LLaVA-OneVision with every weight perturbed, so norms and biases are not
    trivial (HF initialises the q/k/v biases to zero)."""
    return tiny_hf_model("llava_onevision", seed=seed, scale=0.02, **kwargs)


def tiny_processor(hf_config: LlavaOnevisionConfig | None = None):
    """mmlens's composed processor (HF's needs torchvision for its video processor)."""
    return builder.processor(hf_config or tiny_onevision_config())


def onevision_inputs(processor, sizes: list[tuple[int, int]],
                     questions: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Left-padded processor outputs for random images of the given (height, width) sizes."""
    from mmlens.inputs.templates import ONEVISION

    questions = questions or [QUESTIONS[i % len(QUESTIONS)] for i in range(len(sizes))]
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    return dict(processor(images=images, text=[ONEVISION.format(q) for q in questions],
                          padding=True, return_tensors="pt"))
