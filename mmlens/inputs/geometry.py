"""Object boxes -> the image positions (ViT patches) they cover, through LLaVA's preprocessing.

A box is pushed through the same geometry as the image (pad / resize / centre-crop) and a patch
counts as *related* if any of its pixels lies in the box (the paper's rule). All intervals are
half-open, ``[x, x + w)``, and the arithmetic is exact (``Fraction``), so a box that ends exactly
on a patch border never spills into the next patch.

Sizes are ``ImageSize(width, height)`` (``mmlens.core.sizes``); a bare pair is read as
``(width, height)``, PIL's ``Image.size`` order (``as_image_size``).

Three preprocessing modes, for a ``W x H`` image and ``crop_size`` c:

- ``"resize_crop"`` (Hugging Face ``CLIPImageProcessor``): resize so the shortest edge is c, the
  other edge ``int(c * long / short)``, then centre-crop c x c with offset
  ``(new - c) // 2``.
- ``"resize"`` (a processor with ``do_center_crop=False`` and ``size`` c x c): resize to c x c,
  stretching x by ``c / W`` and y by ``c / H``; nothing is cropped.
- ``"pad"`` (original LLaVA-1.5, ``expand2square``): paste the image centred on a square of side
  ``max(W, H)`` at offset ``(max - W) // 2, (max - H) // 2``, then resize to c x c.

For anyres tiles, compose ``corner_box`` -> ``scale_and_shift`` (once per step: resize, pad, tile
origin) -> ``canvas_patch_mask`` on each tile's canvas.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from mmlens.core.sizes import SizeOrPair, as_image_size
from mmlens.data.example import Box
from mmlens.inputs.layouts.grid import MODES, GridLayout, Mode, preprocess_transform
from mmlens.inputs.token_map import CornerBox, canvas_patch_mask, corner_box, scale_and_shift

__all__ = ["MODES", "CornerBox", "Mode", "boxes_to_patch_mask", "canvas_patch_mask",
           "corner_box", "other_image_positions", "preprocess_transform",
           "related_image_positions", "scale_and_shift"]


def boxes_to_patch_mask(
    boxes: Iterable[Box],
    image_size: SizeOrPair,
    crop_size: int = 336,
    patch_size: int = 14,
    mode: Mode = "resize_crop",
) -> torch.BoolTensor:
    """Which of the ``(crop_size // patch_size) ** 2`` patches any box touches.

    ``boxes`` are ``(x, y, w, h)`` in pixels of the original image, of size ``image_size``.
    Returns a row-major bool mask ``[grid * grid]`` (576 for LLaVA-1.5's 336 px, 14 px patches),
    read off the image's token map (``mmlens.inputs.layouts.grid``).
    """
    token_map = GridLayout(crop_size, patch_size, class_token=False).token_map(
        as_image_size(image_size), mode)
    return token_map.related(boxes)


def _as_positions(
    image_positions: int | Sequence[int] | torch.Tensor, n_patches: int
) -> torch.Tensor:
    if isinstance(image_positions, int):
        return torch.arange(image_positions, image_positions + n_patches)
    positions = torch.as_tensor(image_positions, dtype=torch.long).flatten()
    if positions.numel() != n_patches:
        raise ValueError(
            f"{positions.numel()} image positions given but the grid has {n_patches} patches: "
            "pass the positions of the base image's features in row-major patch order"
        )
    return positions


def related_image_positions(
    boxes: Iterable[Box],
    image_size: SizeOrPair,
    image_positions: int | Sequence[int] | torch.Tensor,
    *,
    crop_size: int = 336,
    patch_size: int = 14,
    mode: Mode = "resize_crop",
) -> torch.LongTensor:
    """Sequence positions of the patches the boxes touch.

    ``image_positions`` is either the first image position (the patches follow contiguously) or
    the positions of every patch feature in row-major order. Returns a sorted ``[n_related]``.
    """
    mask = boxes_to_patch_mask(boxes, image_size, crop_size, patch_size, mode)
    return _as_positions(image_positions, mask.numel())[mask]


def other_image_positions(
    image_positions: Sequence[int] | torch.Tensor, related_positions: Sequence[int] | torch.Tensor
) -> torch.LongTensor:
    """Image positions that are not related, in their given order.

    Leave newline positions out of ``image_positions`` (the paper's "other" excludes them).
    """
    positions = torch.as_tensor(image_positions, dtype=torch.long).flatten()
    related = torch.as_tensor(related_positions, dtype=torch.long).flatten()
    return positions[~torch.isin(positions, related)]
