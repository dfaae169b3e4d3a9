"""Where InternVL's image tokens come from, and the boxes they see.

The GotOcr2 image processor (``crop_to_patches``) squashes an image of ``W x H`` onto the canvas
of ``cols x rows`` tiles of ``S x S`` whose aspect ratio is closest to the image's (HF's
``get_optimal_tiled_canvas``, between ``min_patches`` and ``max_patches`` tiles), cuts it into
tiles row by row, and adds a thumbnail (the image squashed to ``S x S``) when there is more than
one tile. Each tile's patch grid is pixel-shuffled, so one image token sees a square of
``2 * patch_size`` pixels of its tile, tokens in row-major order. An object box is related to
every token, in every tile and in the thumbnail, whose square it overlaps.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from mmlens.core.errors import MMLensError
from mmlens.core.sizes import ImageSize
from mmlens.inputs.geometry import canvas_patch_mask, corner_box, scale_and_shift


def tile_side(image_processor: Any) -> int:
    """The processor's square tile side ``S``; raises for a non-square size."""
    size = image_processor.size
    height, width = (size.get("height"), size.get("width")) if isinstance(size, dict) else (
        size.height, size.width)
    if height is None or height != width:
        raise MMLensError(f"the image processor's size {size} is not a square tile: InternVL "
                          "tiles are S x S")
    return int(height)


def tile_grid(image_processor: Any, image_size: ImageSize) -> tuple[int, int]:
    """``(cols, rows)`` of the tiles the processor cuts an image into (``(1, 1)``: one tile,
    no thumbnail)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        get_optimal_tiled_canvas,
    )

    side = tile_side(image_processor)
    low, high = int(image_processor.min_patches), int(image_processor.max_patches)
    if high <= 1:
        return 1, 1
    return get_optimal_tiled_canvas((image_size.height, image_size.width), (side, side),
                                    low, high)


def token_box_mask(image_processor: Any, token_px: int, image_size: ImageSize,
                   boxes: Sequence[Any]) -> Tensor:
    """``[n_image_tokens]`` bool, in input order (tiles row by row, then the thumbnail): the
    tokens whose ``token_px`` square any ``(x, y, w, h)`` box overlaps."""
    side = tile_side(image_processor)
    cols, rows = tile_grid(image_processor, image_size)
    corners = [corner_box(box) for box in boxes]
    canvas = ImageSize(cols * side, rows * side)
    scale = (Fraction(canvas.width, image_size.width), Fraction(canvas.height, image_size.height))
    per_side = side // token_px
    mask = canvas_patch_mask([scale_and_shift(c, scale) for c in corners], canvas, token_px)
    # canvas rows of tokens -> tile by tile, each tile's tokens row-major
    tiles = mask.reshape(rows, per_side, cols, per_side).permute(0, 2, 1, 3).reshape(-1)
    if cols * rows == 1:
        return tiles
    thumb = (Fraction(side, image_size.width), Fraction(side, image_size.height))
    thumbnail = canvas_patch_mask([scale_and_shift(c, thumb) for c in corners],
                                  ImageSize(side, side), token_px)
    return torch.cat([tiles, thumbnail])


def internvl_related_positions(image_processor: Any, vision: Any, image_size: ImageSize,
                               boxes: Sequence[Any], image_positions: Tensor,
                               mode: str | None = None) -> Tensor:
    """Sequence positions of the image tokens the boxes reach; ``image_positions`` are the
    image's ``<IMG_CONTEXT>`` positions in order. ``mode="pad"``: the image was padded to a
    centred square before the processor saw it (``prepare(..., preprocessing="pad")``). Raises
    when the positions' count is not what the processor's tiling makes (another processor or
    another image)."""
    if mode == "pad":
        side = max(image_size.width, image_size.height)
        shift_x, shift_y = (side - image_size.width) // 2, (side - image_size.height) // 2
        boxes = [(x + shift_x, y + shift_y, w, h) for x, y, w, h in boxes]
        image_size = ImageSize(side, side)
    if tile_side(image_processor) != vision.image_size:
        raise MMLensError(f"the image processor makes {tile_side(image_processor)} px tiles but "
                          f"the vision tower takes {vision.image_size} px: is "
                          "preprocessor_config.json from this checkpoint?")
    mask = token_box_mask(image_processor, int(vision.patch_size / vision.shuffle_scale),
                          image_size, boxes)
    positions = torch.as_tensor(image_positions, dtype=torch.long).flatten()
    if positions.numel() != mask.numel():
        raise MMLensError(f"the image has {positions.numel()} image tokens but its {image_size} "
                          f"tiling makes {mask.numel()}: were the image and the prompt prepared "
                          "together?")
    return positions[mask]
