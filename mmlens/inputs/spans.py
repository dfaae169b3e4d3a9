"""Spans derived from object boxes: ``related`` and ``other`` image patches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mmlens.core.errors import MMLensError
from mmlens.core.sizes import ImageSize
from mmlens.data.example import Box, check_box
from mmlens.inputs.geometry import MODES
from mmlens.inputs.protocol import InputsModel

RELATED_RULES: tuple[str, ...] = ("geometry", "paper")
PIXEL_RULE_FAMILIES: tuple[str, ...] = ("llava", "llava_next")
"""The families the paper's pixel rule is defined for (the paper's own checkpoints)."""


def _size_field(size: Any, name: str) -> Any:
    return size.get(name) if isinstance(size, dict) else getattr(size, name, None)


def processor_geometry(image_processor: Any, crop_size: int) -> str:
    """How ``image_processor`` takes an image to the ``crop_size`` square the tower sees.

    ``"resize_crop"`` (shortest edge to ``crop_size``, centre crop), ``"resize"`` (straight to
    ``crop_size`` x ``crop_size``, no crop) or ``"pad"`` (padded to a square first). Raises
    ``MMLensError`` for any other geometry: boxes could not be mapped to patches.
    """
    pads = getattr(image_processor, "do_pad_to_square", False) is True or getattr(
        image_processor, "do_pad", False) is True or getattr(
        image_processor, "mmlens_preprocessing", None) == "pad"
    size, crop = getattr(image_processor, "size", None), getattr(image_processor, "crop_size", None)
    square = (_size_field(size, "height"), _size_field(size, "width")) == (crop_size, crop_size)
    base = None
    if getattr(image_processor, "do_resize", False) is True:
        if not getattr(image_processor, "do_center_crop", False):
            base = "resize" if square else None
        elif (_size_field(crop, "height"), _size_field(crop, "width")) == (crop_size, crop_size):
            if _size_field(size, "shortest_edge") == crop_size:
                base = "resize_crop"
            elif square:
                base = "resize"
    if base is not None:
        return "pad" if pads else base  # a padded square: either takes it to the crop square
    raise MMLensError(
        f"cannot map object boxes through this image processor "
        f"({type(image_processor).__name__}: do_resize="
        f"{getattr(image_processor, 'do_resize', None)}, size={dict(size or {}) or None}, "
        f"do_center_crop={getattr(image_processor, 'do_center_crop', None)}, crop_size="
        f"{dict(crop or {}) or None}): mmlens maps boxes for a resize of the shortest edge to "
        f"{crop_size} then a centre crop, a resize to {crop_size}x{crop_size}, or padding to a "
        "square; use a processor configured like one of these"
    )


def check_preprocessing(processor: Any, mode: str | None, crop_size: int) -> str:
    """``mode`` (default: the processor's geometry), refused where the processor differs.

    ``"pad"`` is done by mmlens before the processor, which then sees a square: any known
    geometry takes a square to the same ``crop_size`` square.
    """
    if mode is not None and mode not in MODES:
        raise MMLensError(f"unknown preprocessing mode {mode!r}: use one of {MODES}")
    actual = processor_geometry(getattr(processor, "image_processor", None), crop_size)
    if mode is None or mode == "pad" or mode == actual:
        return mode or actual
    raise MMLensError(
        f"preprocessing={mode!r} was asked for, but the model's processor does {actual!r}: "
        f"boxes would be mapped to the wrong patches; pass preprocessing={actual!r} (or None)"
    )


def checked_mode(mode: str | None) -> str:
    """``mode`` (default ``"resize_crop"``), refused when it is no known preprocessing mode."""
    mode = mode or "resize_crop"
    if mode not in MODES:
        raise MMLensError(f"unknown preprocessing mode {mode!r}: use one of {MODES}")
    return mode


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

        checked = [[check_box(box, f"example {i}") for box in example_boxes]
                   for i, example_boxes in enumerate(boxes)]
        add_pixel_rule_spans(model, batch, images, checked, mode=mode)
        return
    related, other = [], []
    for i, (image, example_boxes) in enumerate(zip(images, boxes, strict=True)):
        example = batch.examples[i] if batch.examples else None
        where = f"example {getattr(example, 'example_id', i)!r}"
        example_boxes = [check_box(box, where) for box in example_boxes]
        # The family maps boxes through its processor's resizing/tiling, as the pixels go.
        rel, rest = model.family.box_positions(
            model, ImageSize.of(image), example_boxes, batch.positions("image", i), mode)
        related.append(rel)
        other.append(rest)
    batch.add_span("related", related)
    batch.add_span("other", other)
