"""Object boxes -> Qwen-VL image tokens and vision patches, through dynamic resolution.

Qwen's image processor resizes a ``(W, H)`` image, keeping its aspect ratio, to the nearest
multiple of ``patch_size * merge_size`` (28 px for the released checkpoints) on each side with
the pixel count held within ``[min_pixels, max_pixels]`` (``smart_resize``); nothing is cropped
or padded. The resized image is cut into ``patch_size`` px patches; each ``merge_size x
merge_size`` block of patches becomes one image token, so a token covers a 28x28 px cell of the
resized image and the image tokens follow those cells in row-major order. A box is scaled the
way the pixels are and marks every cell (or patch) it overlaps (half-open, exact arithmetic, as
in ``mmlens.inputs.geometry``).
"""

from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mmlens.data.example import Box
from mmlens.inputs.geometry import canvas_patch_mask, corner_box, scale_and_shift


def resized_size(image_size: tuple[int, int], image_processor: Any) -> tuple[int, int]:
    """``(W, H)`` the processor resizes a ``(W, H)`` image to (its ``smart_resize``)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    width, height = image_size
    size = image_processor.size
    min_pixels = size["shortest_edge"] if "shortest_edge" in size else size["min_pixels"]
    max_pixels = size["longest_edge"] if "longest_edge" in size else size["max_pixels"]
    factor = image_processor.patch_size * image_processor.merge_size
    new_h, new_w = smart_resize(height, width, factor=factor, min_pixels=min_pixels,
                                max_pixels=max_pixels)
    return new_w, new_h


def box_cell_mask(
    boxes: Iterable[Box], image_size: tuple[int, int], resized: tuple[int, int], cell: int,
) -> Bool[Tensor, " n_cells"]:
    """Row-major mask of the ``cell`` px cells of the resized ``(W, H)`` image any box touches.

    ``boxes`` are ``(x, y, w, h)`` in pixels of the original ``image_size = (W, H)``.
    """
    width, height = image_size
    scale = (Fraction(resized[0], width), Fraction(resized[1], height))
    corners = [scale_and_shift(corner_box(box), scale) for box in boxes]
    return canvas_patch_mask(corners, resized, cell)


def packed_patch_order(grid_h: int, grid_w: int, merge_size: int) -> Int[Tensor, " n_patches"]:
    """Row-major patch index of each patch in the processor's (merge-block) order."""
    index = torch.arange(grid_h * grid_w).reshape(grid_h, grid_w)
    blocks = index.reshape(grid_h // merge_size, merge_size, grid_w // merge_size, merge_size)
    return blocks.transpose(1, 2).flatten()


def unpack_patches(
    pixel_values: Float[Tensor, "n_patches patch_dim"], grid_h: int, grid_w: int,
    patch_size: int, merge_size: int, temporal_patch_size: int, n_channels: int = 3,
) -> Float[Tensor, "n_channels height width"]:
    """The resized image ``[C, grid_h * patch_size, grid_w * patch_size]`` back from one
    image's packed patches (still rescaled and normalised as the processor left them).

    The processor packs each patch as ``(C, temporal, patch, patch)`` (the still image repeated
    over ``temporal``) and the patches in merge-block order: ``(grid_h / merge, grid_w / merge)``
    blocks row-major, then ``merge x merge`` patches row-major inside a block. Only the first
    ``grid_h * grid_w`` rows are read (``prepare`` pads examples to the longest).
    """
    if grid_h % merge_size or grid_w % merge_size:
        raise ValueError(f"a {grid_h}x{grid_w} patch grid does not split into {merge_size}x"
                         f"{merge_size} merge blocks: is image_grid_thw this image's?")
    n_patches = grid_h * grid_w
    dim = n_channels * temporal_patch_size * patch_size**2
    if pixel_values.shape[0] < n_patches or pixel_values.shape[-1] != dim:
        raise ValueError(f"pixel_values {tuple(pixel_values.shape)} cannot hold a {grid_h}x"
                         f"{grid_w} grid of {dim}-value patches: pass one image's packed rows")
    blocks = pixel_values[:n_patches].reshape(
        grid_h // merge_size, grid_w // merge_size, merge_size, merge_size,
        n_channels, temporal_patch_size, patch_size, patch_size)[:, :, :, :, :, 0]
    # (block_row, block_col, row_in_block, col_in_block, C, py, px) -> (C, y, x)
    return blocks.permute(4, 0, 2, 5, 1, 3, 6).reshape(
        n_channels, grid_h * patch_size, grid_w * patch_size)


def qwen_box_positions(
    boxes: Iterable[Box], image_size: tuple[int, int], image_processor: Any,
    image_positions: Tensor,
) -> tuple[Tensor, Tensor]:
    """(related, other): the image-token positions any box touches, and the rest.

    ``image_positions`` are the sequence positions of the image's tokens, in order; raises when
    their number does not match the processor's geometry for ``image_size``.
    """
    resized = resized_size(image_size, image_processor)
    cell = image_processor.patch_size * image_processor.merge_size
    mask = box_cell_mask(boxes, image_size, resized, cell)
    positions = torch.as_tensor(image_positions, dtype=torch.long).flatten()
    if positions.numel() != mask.numel():
        raise ValueError(
            f"the image has {positions.numel()} tokens but a {image_size[0]}x{image_size[1]} "
            f"image resizes to {resized[0]}x{resized[1]} px, i.e. {mask.numel()} tokens: was "
            "the batch prepared with this model's processor?")
    return positions[mask], positions[~mask]


def qwen_box_patches(
    boxes: Iterable[Box], image_size: tuple[int, int], image_processor: Any,
) -> Int[Tensor, " n_related"]:
    """Vision-side indices (within the image's packed patches) of the patches any box touches.

    These index ``vision.blocks.{l}.*`` positions, offset by the patches of earlier images.
    """
    resized = resized_size(image_size, image_processor)
    patch, merge = image_processor.patch_size, image_processor.merge_size
    mask = box_cell_mask(boxes, image_size, resized, patch)
    order = packed_patch_order(resized[1] // patch, resized[0] // patch, merge)
    return mask[order].nonzero().flatten()
