"""Spans derived from object boxes: ``related`` and ``other`` image patches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmlens.data.example import Box
from mmlens.inputs.checkpoints import default_preprocessing
from mmlens.inputs.geometry import MODES, other_image_positions, related_image_positions

RELATED_RULES: tuple[str, ...] = ("geometry", "paper")


def add_patch_spans(model: Any, batch: Any, images: Sequence[Any], boxes: Sequence[Sequence[Box]],
                    *, mode: str | None = None, rule: str = "geometry") -> None:
    """Add ``related`` (patches any box touches) and ``other`` (the remaining patches) spans.

    ``boxes[i]`` are ``(x, y, w, h)`` in pixels of ``images[i]`` as given to ``prepare``.
    ``rule``: ``"geometry"`` (exact box arithmetic) or ``"paper"`` (the paper's red-pixel
    mask pushed through the processor, ``mmlens.inputs.pixel_rule``).
    """
    if len(boxes) != len(batch):
        raise ValueError(f"got boxes for {len(boxes)} examples but the batch has {len(batch)}")
    mode = mode or default_preprocessing(model)
    if mode not in MODES:
        raise ValueError(f"unknown preprocessing mode {mode!r}: use one of {MODES}")
    if rule not in RELATED_RULES:
        raise ValueError(f"unknown related rule {rule!r}: use one of {RELATED_RULES}")
    if rule == "paper":
        from mmlens.inputs.pixel_rule import add_pixel_rule_spans

        add_pixel_rule_spans(model, batch, images, boxes, mode=mode)
        return
    related, other = [], []
    for i, (image, example_boxes) in enumerate(zip(images, boxes, strict=True)):
        image_positions = batch.positions("image", i)
        if model.cfg.is_anyres:
            from mmlens.inputs.anyres_spans import anyres_related_positions

            rel_local, other_local = anyres_related_positions(
                example_boxes, image.size, model.cfg, mode=mode)
            related.append(image_positions[0] + torch.as_tensor(rel_local, dtype=torch.long))
            other.append(image_positions[0] + torch.as_tensor(other_local, dtype=torch.long))
            continue
        if model.cfg.feature_select_strategy == "full":
            image_positions = image_positions[1:]  # the CLS feature covers no patch
        rel = related_image_positions(
            example_boxes, image.size, image_positions,
            crop_size=model.cfg.vision.image_size, patch_size=model.cfg.vision.patch_size,
            mode=mode,
        )
        related.append(rel)
        other.append(other_image_positions(image_positions, rel))
    batch.add_span("related", related)
    batch.add_span("other", other)
