"""What the conformance checks share: every family with a tiny builder (``mmlens.zoo.tiny``),
its images and prompts, the processor's outputs, and ``Tiny`` (one family's models and inputs).

A family-specific fact a check needs is read from the tiny module when it defines it, else the
default here applies (``hf_vision_layers``, ``hf_vision_rows``, ``hf_decoder_layers``); a new
family's module is picked up with no new test code.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmlens import HookedMultimodalTransformer
from mmlens.inputs.templates import IMAGE_PLACEHOLDER, get_template
from mmlens.model.families import FAMILIES as REGISTERED
from mmlens.zoo.tiny import tiny_families, tiny_module

FAMILIES = [family for family in tiny_families() if family in REGISTERED]
"""Every registered family with a tiny builder (a builder may come before its family is
registered; the suite runs it once it is)."""
VARIANTS = [(family, name) for family in FAMILIES
            for name in getattr(tiny_module(family), "VARIANTS", {})]
"""Every (family, variant) of the tiny modules' ``VARIANTS``: hf_config overrides."""


def random_images(module: ModuleType) -> list[Image.Image]:
    """One random image per size of the module's ``IMAGE_SIZES``."""
    return [Image.fromarray(np.random.default_rng(i).integers(
        0, 256, (size.height, size.width, 3), dtype=np.uint8))
        for i, size in enumerate(module.IMAGE_SIZES)]


def prompts(model: HookedMultimodalTransformer, questions: list[str]) -> list[str]:
    """The family's prompt template (else the one the tokenizer's vocabulary picks), with the
    processor's own image token, as ``prepare`` writes them."""
    tokenizer = model.processor.tokenizer
    template = get_template(model.family.prompt_template, tokenizer)
    image = tokenizer.convert_ids_to_tokens(model.cfg.image_token_id)
    return [template.prefix.replace(IMAGE_PLACEHOLDER, image) + q + template.suffix
            for q in questions]


def hf_vision_layers(module: ModuleType, hf: Any) -> list[torch.nn.Module]:
    """HF's vision-tower blocks, in order (default: the one ``ModuleList`` of the tower)."""
    if hasattr(module, "hf_vision_layers"):
        return list(module.hf_vision_layers(hf))
    tower = getattr(hf.model, "vision_tower", None) or hf.model.visual
    lists = [m for m in tower.modules() if isinstance(m, torch.nn.ModuleList)]
    assert len(lists) == 1, "define hf_vision_layers(hf) in the family's tiny module"
    return list(lists[0])


def hf_vision_rows(module: ModuleType, hf: Any, inputs: dict[str, Any]) -> torch.Tensor | None:
    """Which of our vision rows each row of HF's vision blocks holds (default: the same order,
    None)."""
    if hasattr(module, "hf_vision_rows"):
        return module.hf_vision_rows(hf, inputs)
    return None


def hf_decoder_layers(module: ModuleType, hf: Any) -> list[torch.nn.Module]:
    """HF's decoder layers, in order (default: ``hf.model.language_model.layers``)."""
    if hasattr(module, "hf_decoder_layers"):
        return list(module.hf_decoder_layers(hf))
    return list(hf.model.language_model.layers)


def images_argument(model: HookedMultimodalTransformer,
                    per_prompt: list[list[Image.Image]]) -> list[Any]:
    """The processor's ``images=`` for ``per_prompt`` images of each prompt: one flat list by
    default; one list per prompt where the tiny module sets ``PER_PROMPT_IMAGES`` (Mllama's
    processor counts the images of each prompt)."""
    if getattr(tiny_module(model.family.name), "PER_PROMPT_IMAGES", False):
        return per_prompt
    return [image for images in per_prompt for image in images]


def hf_cross_attention(module: ModuleType, hf: Any, layer: int) -> torch.nn.Module | None:
    """HF's cross-attention module in decoder layer ``layer`` (a family whose image reaches the
    text by cross-attention), None in a self-attention layer (default: the layer's
    ``cross_attn``)."""
    if hasattr(module, "hf_cross_attention"):
        return module.hf_cross_attention(hf, layer)
    return getattr(hf_decoder_layers(module, hf)[layer], "cross_attn", None)


def hf_tower_slots(module: ModuleType, hf: Any, n_seq: int) -> set[int]:
    """The positions of a vision-tower row that an image's span may hold (default: the last
    ``(image_size // patch_size) ** 2``, the patches after the class tokens; all ``n_seq`` on a
    packed tower)."""
    if hasattr(module, "hf_tower_slots"):
        return set(module.hf_tower_slots(hf, n_seq))
    vc = hf.config.vision_config
    side = getattr(vc, "image_size", None)
    n_patches = (side // vc.patch_size) ** 2 if isinstance(side, int) else n_seq
    return set(range(n_seq - n_patches, n_seq))


def processor_inputs(model: HookedMultimodalTransformer, images: list[Image.Image],
                     questions: list[str]) -> dict[str, torch.Tensor]:
    """The model's processor's outputs for one image per question, left padded."""
    text = prompts(model, questions)
    return dict(model.processor(images=images_argument(model, [[image] for image in images]),
                                text=text, padding=True, return_tensors="pt"))


@dataclass
class Tiny:
    """One family's tiny models and inputs, shared by the checks of a module."""

    name: str
    module: ModuleType
    hf: Any
    model: HookedMultimodalTransformer
    processor: Any
    images: list[Image.Image]
    questions: list[str]
    inputs: dict[str, torch.Tensor]  # the processor's outputs for every image, left padded

    def single(self, index: int) -> dict[str, torch.Tensor]:
        """The processor's outputs for image ``index`` alone."""
        return processor_inputs(self.model,
                                [self.images[index]], [self.questions[index]])
