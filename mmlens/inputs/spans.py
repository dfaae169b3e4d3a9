"""Spans derived from object boxes: ``related`` and ``other`` image patches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mmlens.data.example import Box
from mmlens.inputs.geometry import MODES


def default_preprocessing(processor: Any) -> str:
    """``"resize_crop"`` for a processor that centre-crops, ``"pad"`` for one that pads."""
    image_processor = getattr(processor, "image_processor", None)
    if getattr(image_processor, "do_pad_to_square", False) or getattr(
            image_processor, "mmlens_preprocessing", None) == "pad":
        return "pad"
    return "resize_crop"


def add_patch_spans(model: Any, batch: Any, images: Sequence[Any], boxes: Sequence[Sequence[Box]],
                    *, mode: str | None = None) -> None:
    """Add ``related`` (patches any box touches) and ``other`` (the remaining patches) spans.

    ``boxes[i]`` are ``(x, y, w, h)`` in pixels of ``images[i]`` as given to ``prepare``.
    """
    if len(boxes) != len(batch):
        raise ValueError(f"got boxes for {len(boxes)} examples but the batch has {len(batch)}")
    mode = mode or default_preprocessing(model.processor)
    if mode not in MODES:
        raise ValueError(f"unknown preprocessing mode {mode!r}: use one of {MODES}")
    related, other = [], []
    for i, (image, example_boxes) in enumerate(zip(images, boxes, strict=True)):
        # The family maps boxes through its processor's resizing/tiling, as the pixels go.
        rel, rest = model.family.box_positions(
            model, image.size, example_boxes, batch.positions("image", i), mode)
        related.append(rel)
        other.append(rest)
    batch.add_span("related", related)
    batch.add_span("other", other)
