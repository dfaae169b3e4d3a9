"""Spans derived from object boxes: ``related`` and ``other`` image patches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mmlens.core.errors import MMLensError
from mmlens.core.sizes import ImageSize
from mmlens.data.example import Box, check_box
from mmlens.inputs.protocol import InputsModel

RELATED_RULES: tuple[str, ...] = ("geometry", "paper")
PIXEL_RULE_FAMILIES: tuple[str, ...] = ("llava", "llava_next")
"""The families the paper's pixel rule is defined for (the paper's own checkpoints)."""


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
    if rule == "paper":
        if model.family.name not in PIXEL_RULE_FAMILIES:
            raise MMLensError(
                f"related_rule='paper' (the paper's red-pixel mask) is defined for the "
                f"{', '.join(PIXEL_RULE_FAMILIES)} families, not {model.family.name!r}: use "
                "related_rule='geometry', which maps boxes through this family's processor")
        from mmlens.inputs.pixel_rule import add_pixel_rule_spans

        checked = [[check_box(box, f"example {i}", ImageSize.of(image)) for box in example_boxes]
                   for i, (image, example_boxes) in enumerate(zip(images, boxes, strict=True))]
        add_pixel_rule_spans(model, batch, images, checked, mode=mode)
        return
    related, other = [], []
    for i, (image, example_boxes) in enumerate(zip(images, boxes, strict=True)):
        example = batch.examples[i] if batch.examples else None
        where = f"example {getattr(example, 'example_id', i)!r}"
        example_boxes = [check_box(box, where, ImageSize.of(image)) for box in example_boxes]
        # The family maps boxes through its processor's resizing/tiling, as the pixels go.
        rel, rest = model.family.box_positions(
            model, ImageSize.of(image), example_boxes, batch.positions("image", i), mode)
        related.append(rel)
        other.append(rest)
    batch.add_span("related", related)
    batch.add_span("other", other)
