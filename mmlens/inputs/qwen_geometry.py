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
from jaxtyping import Int
from torch import Tensor

from mmlens.data.example import Box
from mmlens.inputs.layouts.merged import MergedLayout, packed_patch_order, unpack_patches

__all__ = ["packed_patch_order", "qwen_box_patches", "qwen_box_positions", "resized_size",
           "unpack_patches"]


def resized_size(image_size: tuple[int, int], image_processor: Any) -> tuple[int, int]:
    """``(W, H)`` the processor resizes a ``(W, H)`` image to (its ``smart_resize``)."""
    return tuple(MergedLayout.from_image_processor(image_processor).resized(image_size))


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
