"""The anyres layout (LLaVA-NeXT, and OneVision's anyres-max): a base tile, then tiles.

For an image of ``W x H`` and tile side ``T``: the base tile is the whole image resized
(squashed) to ``T x T``; the tiles cut the image resized, aspect kept, into the best pinpoint
canvas and pasted at its centre (``mmlens.inputs.anyres_spans.tile_transform``). The tower runs
the base tile (tile 0), then every tile row by row (tile ``1 + tile_row * n_cols + tile_col``);
each tile starts a fresh patch grid. The image tokens are the base tile's patches, then the
kept (unpadded) tile features row by row, each row ended by a learned newline. Under anyres-max
the kept grid is downscaled (bilinear): a packed feature is made from every kept feature its
weights touch (``bilinear_sources``), and its ``row`` / ``col`` / ``tile`` are those of the
first (top-left) of them. With ``mode="pad"`` the image was padded to a square before the
processor saw it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from jaxtyping import Float
from torch import Tensor

from mmlens.core.sizes import ImageSize, SizeOrPair, as_image_size
from mmlens.inputs.tiling import AnyresGeometry, bilinear_sources, read_image_sizes
from mmlens.inputs.token_map import ImageLayout, ImageTokenMap, PatchRef, TileFrame, TokenPlace


def tile_transform(
    image_size: SizeOrPair, geometry: AnyresGeometry
) -> tuple[tuple[Fraction, Fraction], tuple[int, int], ImageSize]:
    """``(scale, paste, canvas)`` placing original pixels on the tiled canvas.

    ``canvas_x = x * scale_x + paste_x`` (``scale`` and ``paste`` are x first, then y). The
    resized size follows the processor: the limiting side fills the canvas, the other is
    rounded up.
    """
    size = as_image_size(image_size)
    canvas = geometry.canvas(size)
    if canvas.width / size.width < canvas.height / size.height:
        new = ImageSize(width=canvas.width, height=min(
            math.ceil(size.height * (canvas.width / size.width)), canvas.height))
    else:
        new = ImageSize(width=min(math.ceil(size.width * (canvas.height / size.height)),
                                  canvas.width), height=canvas.height)
    scale = (Fraction(new.width, size.width), Fraction(new.height, size.height))
    paste = ((canvas.width - new.width) // 2, (canvas.height - new.height) // 2)
    return scale, paste, canvas


@dataclass(frozen=True)
class AnyresLayout(ImageLayout):
    """Anyres tiles of ``geometry``; ``class_token``: each tower row starts with one (CLIP),
    which the features drop."""

    geometry: AnyresGeometry
    class_token: bool = True

    @property
    def tower_length(self) -> int:
        return self.class_offset + self.geometry.grid**2

    @property
    def cell_px(self) -> int:
        return self.geometry.patch_size

    def token_map(self, image_size: Any, mode: str | None = None) -> ImageTokenMap:
        size = as_image_size(image_size)
        geometry, offset = self.geometry, self.class_offset
        grid, patch, tile = geometry.grid, geometry.patch_size, geometry.tile_size
        seen, pad = size, (Fraction(0), Fraction(0))
        if mode == "pad":  # the processor saw the image centred on a square
            side = max(size.width, size.height)
            seen = ImageSize(side, side)
            pad = (Fraction((side - size.width) // 2), Fraction((side - size.height) // 2))
        base_scale = (Fraction(tile, seen.width), Fraction(tile, seen.height))
        base = TileFrame(base_scale, (pad[0] * base_scale[0], pad[1] * base_scale[1]), patch,
                         grid, grid, offset=offset)
        tokens = [TokenPlace("base", 0, r, c, ((0, base.index(r, c)),))
                  for r in range(grid) for c in range(grid)]
        scale, paste, _ = tile_transform(seen, geometry)
        tile_rows, tile_cols = geometry.tile_grid(seen)
        frames = [base] + [
            TileFrame(scale, (paste[0] + pad[0] * scale[0] - col * tile,
                              paste[1] + pad[1] * scale[1] - row * tile),
                      patch, grid, grid, offset=offset)
            for row in range(tile_rows) for col in range(tile_cols)]

        def source(row: int, col: int) -> PatchRef:
            """The patch at ``(row, col)`` of the tiles' feature grid."""
            tile_index = 1 + (row // grid) * tile_cols + col // grid
            return tile_index, frames[tile_index].index(row % grid, col % grid)

        kept = geometry.kept_region(seen)
        packed = geometry.feature_grid(seen)
        row_sources = bilinear_sources(kept.row_stop - kept.row_start, packed.rows)
        col_sources = bilinear_sources(kept.col_stop - kept.col_start, packed.cols)
        col_lists = [[kept.col_start + j for j in col_sources[c].nonzero().flatten().tolist()]
                     for c in range(packed.cols)]
        for r in range(packed.rows):
            rows = [kept.row_start + i for i in row_sources[r].nonzero().flatten().tolist()]
            for cols in col_lists:
                refs = tuple(source(i, j) for i in rows for j in cols)
                tokens.append(TokenPlace("tile", refs[0][0], rows[0] % grid, cols[0] % grid,
                                         refs))
            first = source(rows[0], kept.col_start)[0]
            tokens.append(TokenPlace("newline", first, rows[0] % grid, -1, ()))
        return ImageTokenMap(size, mode, tuple(tokens), tuple(frames), self.tower_length,
                             offset)

    def input_maps(self, batch: Any) -> list[list[ImageTokenMap]]:
        return [[self.token_map(size)] for size in read_image_sizes(batch.image_sizes,
                                                                     len(batch))]

    def view_pixels(self, batch: Any, example: int) -> Float[Tensor, "3 height width"]:
        return batch.pixel_values[example, 0]
