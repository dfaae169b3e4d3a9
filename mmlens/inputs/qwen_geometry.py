"""Object boxes -> Qwen-VL image tokens and vision patches, through dynamic resolution.

Qwen's image processor resizes a ``(W, H)`` image, keeping its aspect ratio, to the nearest
multiple of ``patch_size * merge_size`` (28 px for the released checkpoints) on each side with
the pixel count held within ``[min_pixels, max_pixels]`` (``smart_resize``); nothing is cropped
or padded. The resized image is cut into ``patch_size`` px patches; each ``merge_size x
merge_size`` block of patches becomes one image token, so a token covers a 28x28 px cell of the
resized image and the image tokens follow those cells in row-major order. The token map
(``mmlens.inputs.layouts.merged``) holds that geometry; a box marks every cell (or patch) it
overlaps (half-open, exact arithmetic).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mmlens.data.example import Box
from mmlens.inputs.layouts.merged import MergedLayout, packed_patch_order

__all__ = ["packed_patch_order", "qwen_box_patches", "qwen_box_positions", "resized_size",
           "unpack_patches"]


def resized_size(image_size: tuple[int, int], image_processor: Any) -> tuple[int, int]:
    """``(W, H)`` the processor resizes a ``(W, H)`` image to (its ``smart_resize``)."""
    return tuple(MergedLayout.from_image_processor(image_processor).resized(image_size))


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
    token_map = MergedLayout.from_image_processor(image_processor).token_map(image_size)
    positions = torch.as_tensor(image_positions, dtype=torch.long).flatten()
    if positions.numel() != len(token_map):
        resized = resized_size(image_size, image_processor)
        raise ValueError(
            f"the image has {positions.numel()} tokens but a {image_size[0]}x{image_size[1]} "
            f"image resizes to {resized[0]}x{resized[1]} px, i.e. {len(token_map)} tokens: was "
            "the batch prepared with this model's processor?")
    related = token_map.related(boxes)
    return positions[related], positions[~related]


def qwen_box_patches(
    boxes: Iterable[Box], image_size: tuple[int, int], image_processor: Any,
) -> Int[Tensor, " n_related"]:
    """Vision-side indices (within the image's packed patches) of the patches any box touches.

    These index ``vision.blocks.{l}.*`` positions, offset by the patches of earlier images.
    """
    token_map = MergedLayout.from_image_processor(image_processor).token_map(image_size)
    return torch.tensor(sorted(index for _, index in token_map.related_patches(boxes)),
                        dtype=torch.long)
