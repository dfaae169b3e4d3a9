"""The dynamic-tiles layout (InternVL): tiles of the image plus a thumbnail, 2x2 pixel shuffle.

The GotOcr2 image processor (``crop_to_patches``) squashes an image of ``W x H`` onto the canvas
of ``cols x rows`` tiles of ``S x S`` whose aspect ratio is closest to the image's (HF's
``get_optimal_tiled_canvas``, between ``min_patches`` and ``max_patches`` tiles), cuts it into
tiles row by row, and adds a thumbnail (the whole image squashed to ``S x S``) when there is
more than one tile. Each tile is one tower row, a class token first; its ``g x g`` patch grid is
pixel-shuffled into ``g/2 x g/2`` image tokens, token ``(r, c)`` holding patches
``(2r..2r+1, 2c..2c+1)`` (``mmlens.model.intern_vision.pixel_shuffle``). The image tokens are
the tiles' in tower order, the thumbnail's last (kinds ``tile`` and ``thumbnail``; a one-tile
image has one ``tile``). With ``mode="pad"`` the image was padded to a centred square before the
processor saw it.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mmlens.core.errors import MMLensError
from mmlens.core.sizes import ImageSize, as_image_size
from mmlens.inputs.token_map import ImageLayout, ImageTokenMap, TileFrame, TokenPlace


@dataclass(frozen=True)
class TilesLayout(ImageLayout):
    """``tile_size`` px tiles of ``patch_size`` px patches, ``shuffle x shuffle`` patches per
    token, between ``min_tiles`` and ``max_tiles`` tiles an image (the image processor's
    ``min_patches`` / ``max_patches``)."""

    tile_size: int
    patch_size: int
    min_tiles: int = 1
    max_tiles: int = 12
    shuffle: int = 2
    class_token: bool = True

    @classmethod
    def from_image_processor(cls, image_processor: Any, vision: Any) -> TilesLayout:
        """The processor's tiling with the vision config's patches; raises when the processor's
        tiles are not the tower's."""
        size = image_processor.size
        height, width = (size.get("height"), size.get("width")) if isinstance(size, dict) else (
            size.height, size.width)
        if height is None or height != width:
            raise MMLensError(f"the image processor's size {size} is not a square tile: InternVL "
                              "tiles are S x S")
        if height != vision.image_size:
            raise MMLensError(f"the image processor makes {height} px tiles but the vision tower "
                              f"takes {vision.image_size} px: is preprocessor_config.json from "
                              "this checkpoint?")
        return cls(int(height), vision.patch_size, int(image_processor.min_patches),
                   int(image_processor.max_patches), round(1 / vision.shuffle_scale))

    @property
    def grid(self) -> int:
        return self.tile_size // self.patch_size

    @property
    def tower_length(self) -> int:
        return self.class_offset + self.grid**2

    @property
    def cell_px(self) -> int:
        return self.shuffle * self.patch_size

    def tile_grid(self, image_size: Any) -> tuple[int, int]:
        """``(cols, rows)`` of the tiles the processor cuts an image into (``(1, 1)``: one
        tile, no thumbnail)."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
            get_optimal_tiled_canvas,
        )

        size = as_image_size(image_size)
        if self.max_tiles <= 1:
            return 1, 1
        side = self.tile_size
        return get_optimal_tiled_canvas((size.height, size.width), (side, side),
                                        self.min_tiles, self.max_tiles)

    def token_map(self, image_size: Any, mode: str | None = None) -> ImageTokenMap:
        size = as_image_size(image_size)
        seen, pad = size, (Fraction(0), Fraction(0))
        if mode == "pad":  # the processor saw the image centred on a square
            side = max(size.width, size.height)
            seen = ImageSize(side, side)
            pad = (Fraction((side - size.width) // 2), Fraction((side - size.height) // 2))
        return self._map(size, seen, pad, self.tile_grid(seen), mode)

    def _map(self, size: ImageSize, seen: ImageSize, pad: tuple[Fraction, Fraction],
             tile_grid: tuple[int, int], mode: str | None) -> ImageTokenMap:
        cols, rows = tile_grid
        side, grid = self.tile_size, self.grid
        scale = (Fraction(cols * side, seen.width), Fraction(rows * side, seen.height))
        frames = [TileFrame(scale, (pad[0] * scale[0] - col * side,
                                    pad[1] * scale[1] - row * side),
                            self.patch_size, grid, grid, offset=self.class_offset)
                  for row in range(rows) for col in range(cols)]
        if len(frames) > 1:
            thumb = (Fraction(side, seen.width), Fraction(side, seen.height))
            frames.append(TileFrame(thumb, (pad[0] * thumb[0], pad[1] * thumb[1]),
                                    self.patch_size, grid, grid, offset=self.class_offset))
        m, per_side = self.shuffle, grid // self.shuffle
        tokens = tuple(
            TokenPlace("thumbnail" if 0 < t == len(frames) - 1 else "tile", t, r, c,
                       tuple((t, frame.index(m * r + i, m * c + j))
                             for i in range(m) for j in range(m)))
            for t, frame in enumerate(frames) for r in range(per_side) for c in range(per_side))
        return ImageTokenMap(size, mode, tokens, tuple(frames), self.tower_length,
                             self.class_offset)

    def view_tile(self, token_map: ImageTokenMap) -> int:
        """The thumbnail (the whole image), or the one tile of a one-tile image."""
        return token_map.n_tiles - 1

    def _counts(self, batch: Any) -> list[int]:
        if batch.image_sizes is None:
            raise ValueError("the batch's image tokens cannot be mapped onto InternVL's tiles: "
                             "it has no num_patches (image_sizes); build it with model.prepare")
        return torch.as_tensor(batch.image_sizes).reshape(-1).tolist()

    def input_maps(self, batch: Any) -> list[list[ImageTokenMap]]:
        """One map per example from its tile count alone: the tiles (all but the thumbnail)
        laid side by side in one row, so patches are exact and boxes are in pixels of that
        row of tiles (the inputs do not say how the tiles stood)."""
        maps = []
        for n in self._counts(batch):
            cols = n - 1 if n > 1 else 1
            seen = ImageSize(cols * self.tile_size, self.tile_size)
            maps.append([self._map(seen, seen, (Fraction(0), Fraction(0)), (cols, 1), None)])
        return maps

    def view_pixels(self, batch: Any, example: int) -> Float[Tensor, "3 height width"]:
        """The view tile's pixels: the last real tile of the example (prepare's pixel values
        are ``[examples, most tiles, 3, S, S]``, zero padded)."""
        return batch.pixel_values[example, self._counts(batch)[example] - 1]
