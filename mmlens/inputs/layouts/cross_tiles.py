"""The cross-attention tiles layout (Llama-3.2-Vision): the image's "tokens" are the keys of
the cross-attention layers, never positions of the prompt.

Mllama's image processor picks the canvas of ``cols x rows`` tiles of ``T x T`` (at most
``max_tiles``) that scales the image least (HF's ``get_optimal_tiled_canvas``), resizes the
image to fit it keeping its aspect ratio (``get_image_size_fit_to_canvas``), pads right and
bottom with zeros and cuts the canvas into tiles row by row. The tower runs every tile of an
image in one row (its local transformer attends across tiles): tile ``t`` holds positions
``t * n_padded ...``, the class token first, then the ``g x g`` patches row-major, then rows of
padding. The cross-attention keys of one image are ``max_tiles x (1 + g*g)``: per tile its class
token and patches, padding tiles included (kind ``padding``: no pixels). So key ``k`` of an
image is token ``k`` of its map, and a span over the keys (``related`` / ``other``) holds key
indices (``MultimodalBatch.key_spans``).
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
class CrossTilesLayout(ImageLayout):
    """``tile_size`` px tiles of ``patch_size`` px patches, at most ``max_tiles`` an image,
    each ``n_padded`` positions of the tower row; ``aspect_ratios``: the config's
    ``supported_aspect_ratios`` (``(rows, cols)``, as HF's processor looks them up; aspect
    ratio id ``k`` is entry ``k - 1``)."""

    tile_size: int
    patch_size: int
    max_tiles: int
    n_padded: int
    aspect_ratios: tuple[tuple[int, int], ...]
    class_token: bool = True
    in_sequence: bool = False

    @classmethod
    def from_image_processor(cls, image_processor: Any, vision: Any) -> CrossTilesLayout:
        """The processor's tiling with the vision config's patches; raises when the processor's
        tiles are not the tower's."""
        size = image_processor.size
        height, width = (size.get("height"), size.get("width")) if isinstance(size, dict) else (
            size.height, size.width)
        if height != vision.image_size or width != vision.image_size:
            raise MMLensError(f"the image processor makes {height}x{width} px tiles but the "
                              f"vision tower takes {vision.image_size} px: is "
                              "preprocessor_config.json from this checkpoint?")
        if int(image_processor.max_image_tiles) != vision.max_tiles:
            raise MMLensError(f"the image processor cuts up to {image_processor.max_image_tiles}"
                              f" tiles but the vision tower takes {vision.max_tiles}")
        return cls(vision.image_size, vision.patch_size, vision.max_tiles, vision.n_padded,
                   vision.supported_aspect_ratios)

    @property
    def grid(self) -> int:
        return self.tile_size // self.patch_size

    @property
    def n_keys(self) -> int:
        """Cross-attention keys of one image (padding tiles included)."""
        return self.max_tiles * (1 + self.grid**2)

    @property
    def tower_length(self) -> int:
        return self.max_tiles * self.n_padded

    @property
    def cell_px(self) -> int:
        return self.patch_size

    def canvas(self, image_size: Any) -> tuple[int, int, ImageSize]:
        """``(cols, rows, resized)``: the processor's tiles and the size it resizes to."""
        from transformers.models.mllama.image_processing_pil_mllama import (
            get_image_size_fit_to_canvas,
            get_optimal_tiled_canvas,
        )

        size, side = as_image_size(image_size), self.tile_size
        height, width = get_optimal_tiled_canvas(size.height, size.width, self.max_tiles, side)
        new_h, new_w = get_image_size_fit_to_canvas(size.height, size.width, int(height),
                                                     int(width), side)
        return int(width) // side, int(height) // side, ImageSize(int(new_w), int(new_h))

    def token_map(self, image_size: Any, mode: str | None = None) -> ImageTokenMap:
        size = as_image_size(image_size)
        cols, rows, resized = self.canvas(size)
        scale = (Fraction(resized.width, size.width), Fraction(resized.height, size.height))
        return self._map(size, scale, cols, rows, mode)

    def _map(self, size: ImageSize, scale: tuple[Fraction, Fraction], cols: int, rows: int,
             mode: str | None) -> ImageTokenMap:
        side, grid = self.tile_size, self.grid
        frames = [TileFrame(scale, (Fraction(-col * side), Fraction(-row * side)),
                            self.patch_size, grid, grid, offset=t * self.n_padded + 1)
                  for t, (row, col) in enumerate((r, c) for r in range(rows)
                                                 for c in range(cols))]
        tokens: list[TokenPlace] = []
        for t in range(self.max_tiles):
            if t < len(frames):
                frame = frames[t]
                tokens.append(TokenPlace("class", t, -1, -1, ((t, t * self.n_padded),)))
                tokens += [TokenPlace("tile", t, r, c, ((t, frame.index(r, c)),))
                           for r in range(grid) for c in range(grid)]
            else:
                tokens += [TokenPlace("padding", t, -1, -1, ())] * (1 + grid**2)
        return ImageTokenMap(size, mode, tuple(tokens), tuple(frames), self.tower_length,
                             self.class_offset, one_row=True)

    def _tiles(self, batch: Any) -> list[tuple[int, int]]:
        """``(cols, rows)`` of each example's image, from its aspect ratio id."""
        if batch.image_sizes is None:
            raise ValueError("the batch's image keys cannot be mapped onto Mllama's tiles: it "
                             "has no aspect_ratio_ids (image_sizes); build it with "
                             "model.prepare")
        ids = torch.as_tensor(batch.image_sizes).reshape(len(batch), -1)[:, 0].tolist()
        return [tuple(self.aspect_ratios[i - 1])[::-1] if i > 0 else (0, 0) for i in ids]

    def input_maps(self, batch: Any) -> list[list[ImageTokenMap]]:
        """One map per example from its aspect ratio id alone: boxes in pixels of the padded
        canvas the tower saw."""
        maps = []
        for cols, rows in self._tiles(batch):
            seen = ImageSize(max(cols, 1) * self.tile_size, max(rows, 1) * self.tile_size)
            maps.append([self._map(seen, (Fraction(1), Fraction(1)), cols, rows, None)])
        return maps

    def view_pixels(self, batch: Any, example: int) -> Float[Tensor, "3 height width"]:
        """The first tile of the example's first image (``[batch, images, tiles, 3, T, T]``)."""
        return batch.pixel_values[example, 0, 0]
