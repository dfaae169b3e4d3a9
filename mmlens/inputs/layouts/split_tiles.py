"""The split-tiles layout (Idefics3, SmolVLM): rows x cols tiles after a resize, then a
global view, each tile pixel-shuffled into tokens.

The image processor (``Idefics3ImageProcessorPil``, SmolVLM's is the same) resizes a ``W x H``
image so its longest edge is ``size["longest_edge"]`` (the other edge ``int(...)``, rounded up
to even), then each edge up to a whole number of ``T = max_image_size["longest_edge"]`` tiles;
when the result is larger than one tile it is cut into ``rows x cols`` tiles, row-major, and the
whole image is resized (squashed) to ``T x T`` (the global view, token kind ``thumbnail``) and
follows them; an image of one tile is only that view. The vision tower runs every tile as its
own row, in that order, without a class token. Each tile's tokens are its
``(T / patch / scale)^2`` pixel-shuffled squares of ``scale x scale`` patches, row-major. The
``<row_r_col_c>`` / ``<global-img>`` markers the processor writes are text tokens, not image
tokens, so the map holds none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mmlens.core.errors import MMLensError
from mmlens.core.sizes import ImageSize, SizeOrPair, as_image_size
from mmlens.inputs.token_map import (
    ImageLayout,
    ImageTokenMap,
    TileFrame,
    TokenPlace,
)

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
class SplitTilesLayout(ImageLayout):
    """What the tiling depends on: the resize target (None: no resize before tiling), the tile
    side, whether images are split, and the tower's patch side and pixel-shuffle factor."""

    longest_edge: int | None
    tile: int
    splitting: bool
    patch: int
    scale: int

    @classmethod
    def from_image_processor(cls, image_processor: Any, patch: int,
                             scale: int) -> SplitTilesLayout:
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
                   bool(getattr(image_processor, "do_image_splitting", True)), patch, scale)

    @classmethod
    def from_processor(cls, image_processor: Any, vision: Any) -> SplitTilesLayout:
        """From the image processor, checked against the vision config."""
        layout = cls.from_image_processor(image_processor, vision.patch_size,
                                          vision.scale_factor)
        if layout.tile != vision.image_size:
            raise MMLensError(
                f"the image processor cuts {layout.tile} px tiles but the vision tower takes "
                f"{vision.image_size} px: is preprocessor_config.json from this checkpoint?")
        return layout

    @property
    def grid_side(self) -> int:
        """Patches a side of a tile."""
        return self.tile // self.patch

    @property
    def tower_length(self) -> int:
        return self.grid_side ** 2

    @property
    def cell_px(self) -> int:
        return self.patch * self.scale

    @property
    def tokens_per_tile(self) -> int:
        return (self.grid_side // self.scale) ** 2

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

    def token_map(self, image_size: Any, mode: str | None = None) -> ImageTokenMap:
        """Tiles row-major (tower rows ``0 .. rows * cols - 1``), then the global view."""
        size = as_image_size(image_size)
        resized, (rows, cols) = self.resized(size), self.grid(size)
        side, zero = self.grid_side, Fraction(0)
        to_resized = (Fraction(resized.width, size.width), Fraction(resized.height, size.height))
        frames = [TileFrame(to_resized, (Fraction(-col * self.tile), Fraction(-row * self.tile)),
                            self.patch, side, side)
                  for row in range(rows) for col in range(cols)]
        frames.append(TileFrame((Fraction(self.tile, size.width),
                                 Fraction(self.tile, size.height)), (zero, zero),
                                self.patch, side, side))
        s, per_side = self.scale, side // self.scale
        tokens = tuple(
            TokenPlace("tile" if t < len(frames) - 1 else "thumbnail", t, r, c,
                       tuple((t, frame.index(r * s + i, c * s + j))
                             for i in range(s) for j in range(s)))
            for t, frame in enumerate(frames) for r in range(per_side) for c in range(per_side))
        return ImageTokenMap(size, mode, tokens, tuple(frames), self.tower_length, 0)

    def input_maps(self, batch: Any) -> list[list[ImageTokenMap]]:
        raise ValueError("an Idefics3 batch's tiles do not tell the image's size, so its image "
                         "tokens cannot be mapped from the model inputs alone: build the batch "
                         "with model.prepare")

    def view_tile(self, token_map: ImageTokenMap) -> int:
        """The global view: the whole image (tile 0 is only its top-left part)."""
        return token_map.n_tiles - 1

    def view_pixels(self, batch: Any, example: int) -> Float[Tensor, "3 height width"]:
        """The global view: the example's last real frame (its ``pixel_attention_mask`` not all
        zero; zero frames pad the image axis)."""
        frames = batch.pixel_values[example]
        if batch.image_sizes is None:
            return frames[-1]
        real = torch.as_tensor(batch.image_sizes[example]).flatten(1).any(1)
        return frames[int(real.nonzero().max())]
