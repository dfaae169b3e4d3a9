"""Idefics3 / SmolVLM tiling: object boxes -> the image tokens of every tile they reach and of
the global view, through the processor's own resizing.

The image processor (``Idefics3ImageProcessorPil``, SmolVLM's is the same) resizes a ``W x H``
image so its longest edge is ``size["longest_edge"]`` (the other edge ``int(...)``, rounded up
to even), then each edge up to a whole number of ``T = max_image_size["longest_edge"]`` tiles;
when the result is larger than one tile it is cut into ``rows x cols`` tiles, row-major, and the
whole resized image is resized to ``T x T`` (the global view) and follows them. An image of one
tile is only that view. Each tile's tokens are its ``(T / patch / scale)^2`` pixel-shuffled
squares of ``patch * scale`` px, row-major, so a box marks a token when it covers a pixel of
that square (half-open, exact: ``mmlens.inputs.geometry``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from mmlens.core.errors import MMLensError
from mmlens.core.sizes import ImageSize, SizeOrPair, as_image_size
from mmlens.data.example import Box
from mmlens.inputs.geometry import canvas_patch_mask, corner_box, scale_and_shift

MAX_IMAGE_SIZE = 4096
"""HF's cap on the resized image's longest edge."""


def _rescale_to_longest(height: int, width: int, longest: int) -> tuple[int, int]:
    """HF's ``_resize_output_size_rescale_to_max_len``: the long edge to ``longest``, the other
    ``int`` of it, rounded up to even."""
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        height, width = longest, int(longest * aspect)
        width += width % 2
    return max(height, 1), max(width, 1)


def _cap(height: int, width: int, most: int) -> tuple[int, int]:
    """HF's ``_resize_output_size_scale_below_upper_bound``."""
    aspect = width / height
    if width >= height and width > most:
        width, height = most, int(most / aspect)
    elif height > width and height > most:
        height, width = most, int(most * aspect)
    return max(height, 1), max(width, 1)


@dataclass(frozen=True)
class TileGeometry:
    """What the tiling depends on: the resize target, the tile side, whether images are split,
    and the tower's patch and pixel-shuffle sizes."""

    longest_edge: int | None  # None: no resize before tiling
    tile: int
    splitting: bool
    token_px: int  # side in tile pixels of one image token: patch * scale_factor

    @classmethod
    def from_image_processor(cls, image_processor: Any, token_px: int) -> TileGeometry:
        """From the checkpoint's image processor (``size``, ``max_image_size``,
        ``do_resize``, ``do_image_splitting``)."""
        tile = dict(getattr(image_processor, "max_image_size", None) or {}).get("longest_edge")
        size = dict(getattr(image_processor, "size", None) or {})
        resize = bool(getattr(image_processor, "do_resize", True))
        if tile is None or (resize and "longest_edge" not in size):
            raise MMLensError(
                f"the image processor has size {size} and max_image_size "
                f"{getattr(image_processor, 'max_image_size', None)}; mmlens maps boxes through "
                "Idefics3's longest-edge resize and square tiles only")
        return cls(size["longest_edge"] if resize else None, tile,
                   bool(getattr(image_processor, "do_image_splitting", True)), token_px)

    @classmethod
    def from_processor(cls, image_processor: Any, vision: Any) -> TileGeometry:
        """From the image processor, checked against the vision config."""
        geometry = cls.from_image_processor(image_processor,
                                            vision.patch_size * vision.scale_factor)
        if geometry.tile != vision.image_size:
            raise MMLensError(
                f"the image processor cuts {geometry.tile} px tiles but the vision tower takes "
                f"{vision.image_size} px: is preprocessor_config.json from this checkpoint?")
        return geometry

    @property
    def tokens_per_tile(self) -> int:
        return (self.tile // self.token_px) ** 2

    def resized(self, image_size: SizeOrPair) -> ImageSize:
        """The size the image is tiled at (whole tiles), or ``T x T`` without splitting."""
        size = as_image_size(image_size)
        if not self.splitting:
            return ImageSize(self.tile, self.tile)
        height, width = size.height, size.width
        if self.longest_edge is not None:
            height, width = _rescale_to_longest(height, width, self.longest_edge)
            height, width = _cap(height, width, MAX_IMAGE_SIZE)
        aspect, t = width / height, self.tile
        if width >= height:
            width = math.ceil(width / t) * t
            height = math.ceil(int(width / aspect) / t) * t
        else:
            height = math.ceil(height / t) * t
            width = math.ceil(int(height * aspect) / t) * t
        return ImageSize(width, height)

    def grid(self, image_size: SizeOrPair) -> tuple[int, int]:
        """``(rows, cols)`` of tiles, ``(0, 0)`` for an image that is only the global view (the
        numbers the processor writes as ``<row_r_col_c>``)."""
        resized = self.resized(image_size)
        if resized.width > self.tile or resized.height > self.tile:
            return resized.height // self.tile, resized.width // self.tile
        return 0, 0

    def n_tokens(self, image_size: SizeOrPair) -> int:
        rows, cols = self.grid(image_size)
        return (rows * cols + 1) * self.tokens_per_tile

    def token_mask(self, image_size: SizeOrPair, boxes: Iterable[Box]) -> torch.BoolTensor:
        """Which of the image's tokens (tiles row-major, then the global view) the boxes
        touch: ``[n_tokens]``."""
        size = as_image_size(image_size)
        resized, (rows, cols) = self.resized(size), self.grid(size)
        corners = [corner_box(box) for box in boxes]
        tile_canvas = ImageSize(self.tile, self.tile)
        masks = []
        to_resized = (Fraction(resized.width, size.width), Fraction(resized.height, size.height))
        for row in range(rows):
            for col in range(cols):
                shift = (-col * self.tile, -row * self.tile)
                in_tile = [scale_and_shift(c, to_resized, shift) for c in corners]
                masks.append(canvas_patch_mask(in_tile, tile_canvas, self.token_px))
        to_global = (Fraction(self.tile, size.width), Fraction(self.tile, size.height))
        masks.append(canvas_patch_mask([scale_and_shift(c, to_global) for c in corners],
                                       tile_canvas, self.token_px))
        return torch.cat(masks)


def tile_box_positions(geometry: TileGeometry, image_size: ImageSize, boxes: Iterable[Box],
                       image_positions: torch.Tensor) -> torch.LongTensor:
    """The positions of the tokens the boxes touch, among one image's ``image_positions``."""
    expected = geometry.n_tokens(image_size)
    if image_positions.numel() != expected:
        raise MMLensError(
            f"the prompt holds {image_positions.numel()} image tokens but an image of "
            f"{image_size} makes {expected} ({geometry.grid(image_size)} tiles plus the global "
            "view): spans from boxes need one image per prompt, processed by this checkpoint's "
            "processor")
    return image_positions[geometry.token_mask(image_size, boxes)]
