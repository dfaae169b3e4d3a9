"""Spans derived from object boxes: ``related`` and ``other`` image patches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmlens.core.errors import MMLensError
from mmlens.core.sizes import ImageSize
from mmlens.data.example import Box, check_box
from mmlens.inputs.protocol import InputsModel
from mmlens.inputs.token_map import ImageTokenMap, build_token_maps

RELATED_RULES: tuple[str, ...] = ("geometry", "paper")


def add_patch_spans(model: InputsModel, batch: Any, images: Sequence[Any],
                    boxes: Sequence[Sequence[Box]], *, mode: str | None = None,
                    rule: str = "geometry") -> None:
    """Add ``related`` (patches any box touches) and ``other`` (the remaining patches) spans.

    ``boxes[i]`` are ``(x, y, w, h)`` in pixels of ``images[i]`` as given to ``prepare``.
    ``rule``: ``"geometry"`` (exact box arithmetic) or ``"paper"`` (the paper's red-pixel
    mask pushed through the processor, ``mmlens.inputs.pixel_rule``).
    """
    if len(boxes) != len(batch):
        raise ValueError(f"got boxes for {len(boxes)} examples but the batch has {len(batch)}")
    if rule not in RELATED_RULES:
        raise MMLensError(f"unknown related rule {rule!r}: use one of {RELATED_RULES}")
    mode = model.family.preprocessing_mode(model, mode)
    maps = _token_maps(model, batch, images, mode)
    if rule == "paper":
        if not model.family.pixel_rule:
            raise MMLensError(
                f"related_rule='paper' (the paper's red-pixel mask) is defined for the paper's "
                f"families (LLaVA-1.5, LLaVA-NeXT), not {model.family.name!r}: use "
                "related_rule='geometry', which maps boxes through this family's processor")
        from mmlens.inputs.pixel_rule import add_pixel_rule_spans

        checked = [[check_box(box, f"example {i}", ImageSize.of(image)) for box in example_boxes]
                   for i, (image, example_boxes) in enumerate(zip(images, boxes, strict=True))]
        add_pixel_rule_spans(model, batch, images, checked, maps, mode=mode)
        return
    related, other = [], []
    in_sequence = model.family.image_layout(model).in_sequence
    for i, (image, example_boxes) in enumerate(zip(images, boxes, strict=True)):
        example = batch.examples[i] if batch.examples else None
        where = f"example {getattr(example, 'example_id', i)!r}"
        example_boxes = [check_box(box, where, ImageSize.of(image)) for box in example_boxes]
        # The image's token map follows the processor's resizing/tiling, as the pixels go.
        token_map = maps[i]
        # Where the image is not in the prompt, its tokens are cross-attention keys.
        positions = (batch.positions("image", i) if in_sequence
                     else torch.arange(len(token_map)))
        touched = token_map.related(example_boxes)
        related.append(positions[touched])
        other.append(positions[token_map.sees_pixels() & ~touched])
    keys = None if in_sequence else len(maps[0])
    batch.add_span("related", related, keys=keys)
    batch.add_span("other", other, keys=keys)


def _token_maps(model: InputsModel, batch: Any, images: Sequence[Any],
                mode: str) -> list[ImageTokenMap]:
    """The map of each example's image: the batch's own where it was built for these images
    and this preprocessing, else built here from the model's image layout."""
    layout = model.family.image_layout(model)
    if layout is None:
        raise MMLensError(f"the {model.family.name!r} family declares no image layout "
                          "(Family.image_layout), so boxes cannot be mapped to its image tokens")
    if len(images) != len(batch):
        raise ValueError(f"got {len(images)} images but the batch has {len(batch)} examples")
    maps = batch.token_maps
    if maps is None or any(len(m) != 1 for m in maps) or any(
            m[0].mode != mode or m[0].image_size != ImageSize.of(image)
            for m, image in zip(maps, images, strict=True)):
        maps = build_token_maps(layout, batch, images, mode)
    return [m[0] for m in maps]
