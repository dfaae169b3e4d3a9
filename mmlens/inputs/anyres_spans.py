"""Where each anyres image position comes from (LLaVA-NeXT, LLaVA-OneVision), and the spans
built on that.

For one image, ``image_position_map`` lists every image position in input order with its
kind (``"base"``, ``"tile"`` or ``"newline"``), the tile and patch it holds and the pixel box it
covers in the original image. ``anyres_related_positions`` pushes object boxes through the same
tiling and unpadding. Sizes are ``ImageSize(width, height)``; a bare pair is read as
``(width, height)``, PIL's ``Image.size`` order (``as_image_size``). The processor's
``image_sizes`` rows, ``(height, width)``, are read by ``read_image_sizes``.

The processor's geometry, for an image of ``W x H`` and tile side ``T``:

- base tile: the whole image resized (squashed) to ``T x T``;
- tiles: the image resized, aspect kept, into the best pinpoint canvas (``AnyresGeometry.canvas``),
  pasted at its centre with zero padding, and cut into ``T x T`` tiles, row by row.

Under OneVision's anyres-max the kept tile features are then resized (bilinear): each packed
feature mixes the kept features its bilinear weights touch (``bilinear_sources``), so it covers
the union of their pixels, and it is related when any of them is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

import torch
from torch import Tensor

from mmlens.core.sizes import ImageSize, SizeOrPair, as_image_size
from mmlens.inputs.geometry import CornerBox, canvas_patch_mask, corner_box, scale_and_shift
from mmlens.inputs.protocol import InputsModel
from mmlens.inputs.tiling import AnyresGeometry, bilinear_sources, read_image_sizes

Kind = Literal["base", "tile", "newline"]
PixelBox = tuple[float, float, float, float]


@dataclass(frozen=True)
class ImagePosition:
    """One image position of an anyres image.

    ``tile_row`` / ``tile_col``: the high-resolution tile (-1 for the base tile; a newline
    keeps the tile row of the feature row it ends). ``patch_row`` / ``patch_col``: the patch inside
    that tile (``patch_col`` is -1 for a newline); for a downscaled feature, those of the first
    (top-left) kept feature it draws on. ``box``: ``(x0, y0, x1, y1)``, half-open, in
    original-image pixels, clipped to the image (empty for a feature that only sees padding;
    the union of its sources' boxes for a downscaled feature); None for a newline.
    """

    kind: Kind
    tile_row: int
    tile_col: int
    patch_row: int
    patch_col: int
    box: PixelBox | None


def _geometry(grid_info: Any) -> AnyresGeometry:
    return grid_info if isinstance(grid_info, AnyresGeometry) else AnyresGeometry.from_config(
        grid_info)


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


def _to_image(canvas_box: CornerBox, scale: tuple[Fraction, Fraction], shift: tuple[int, int],
              size: ImageSize) -> PixelBox:
    """A canvas box back in original pixels, clipped to the image."""
    x0, y0, x1, y1 = canvas_box
    bounds = (size.width, size.height) * 2
    mapped = ((x0 - shift[0]) / scale[0], (y0 - shift[1]) / scale[1],
              (x1 - shift[0]) / scale[0], (y1 - shift[1]) / scale[1])
    return tuple(float(min(max(v, 0), bound)) for v, bound in zip(mapped, bounds, strict=True))


def _canvas_patch_box(row: int, col: int, geometry: AnyresGeometry) -> CornerBox:
    """Canvas pixels seen by the patch at ``(row, col)`` of the tiles' feature grid: each tile
    starts a fresh patch grid (a tile side need not be a whole number of patches)."""
    grid, patch, tile = geometry.grid, geometry.patch_size, geometry.tile_size
    x0 = (col // grid) * tile + (col % grid) * patch
    y0 = (row // grid) * tile + (row % grid) * patch
    return (x0, y0, x0 + patch, y0 + patch)


def _union(boxes: list[PixelBox]) -> PixelBox:
    """The smallest box holding every non-empty box (the first box when all are empty)."""
    filled = [b for b in boxes if b[2] > b[0] and b[3] > b[1]] or boxes[:1]
    return (min(b[0] for b in filled), min(b[1] for b in filled),
            max(b[2] for b in filled), max(b[3] for b in filled))


def image_position_map(image_size: SizeOrPair, grid_info: Any) -> list[ImagePosition]:
    """Every image position of one image, in input order.

    ``image_size`` is the original image's size; ``grid_info`` an ``AnyresGeometry`` or the
    model's config. ``len(result) == geometry.n_image_tokens(image_size)``.
    """
    geometry = _geometry(grid_info)
    size = as_image_size(image_size)
    grid, patch, tile = geometry.grid, geometry.patch_size, geometry.tile_size
    base_scale = (Fraction(tile, size.width), Fraction(tile, size.height))
    positions = [
        ImagePosition("base", -1, -1, r, c, _to_image(
            (c * patch, r * patch, (c + 1) * patch, (r + 1) * patch), base_scale, (0, 0), size))
        for r in range(grid) for c in range(grid)
    ]
    scale, paste, _ = tile_transform(size, geometry)
    kept = geometry.kept_region(size)
    boxes = [[_to_image(_canvas_patch_box(row, col, geometry), scale, paste, size)
              for col in range(kept.col_start, kept.col_stop)]
             for row in range(kept.row_start, kept.row_stop)]
    packed = geometry.feature_grid(size)
    row_sources = bilinear_sources(kept.row_stop - kept.row_start, packed.rows)
    col_sources = bilinear_sources(kept.col_stop - kept.col_start, packed.cols)
    for r in range(packed.rows):
        src_rows = row_sources[r].nonzero().flatten().tolist()
        row = kept.row_start + src_rows[0]
        for c in range(packed.cols):
            src_cols = col_sources[c].nonzero().flatten().tolist()
            col = kept.col_start + src_cols[0]
            box = _union([boxes[i][j] for i in src_rows for j in src_cols])
            positions.append(ImagePosition("tile", row // grid, col // grid, row % grid,
                                           col % grid, box))
        positions.append(ImagePosition("newline", row // grid, -1, row % grid, -1, None))
    return positions


def anyres_masks(
    boxes: Iterable[tuple[float, float, float, float]], image_size: SizeOrPair, grid_info: Any,
) -> tuple[torch.BoolTensor, torch.BoolTensor]:
    """``(related, newline)`` bool masks over one image's positions ``[n_image_tokens]``.

    ``boxes`` are ``(x, y, w, h)`` in original pixels; a position is related when its patch
    holds any pixel of any box (in the base tile or in a high-resolution tile).
    """
    geometry = _geometry(grid_info)
    size = as_image_size(image_size)
    corners = [corner_box(box) for box in boxes]
    tile = geometry.tile_size
    tile_square = ImageSize(tile, tile)
    base_scale = (Fraction(tile, size.width), Fraction(tile, size.height))
    base = canvas_patch_mask([scale_and_shift(c, base_scale) for c in corners], tile_square,
                             geometry.patch_size)
    scale, paste, _ = tile_transform(size, geometry)
    on_canvas = [scale_and_shift(c, scale, paste) for c in corners]
    tile_grid = geometry.tile_grid(size)
    tiles = torch.cat([torch.cat([
        canvas_patch_mask([scale_and_shift(c, (1, 1), (-tc * tile, -tr * tile))
                           for c in on_canvas], tile_square, geometry.patch_size)
        .view(geometry.grid, geometry.grid) for tc in range(tile_grid.cols)], dim=1)
        for tr in range(tile_grid.rows)])
    kept = geometry.kept_region(size)
    tiles = tiles[kept.row_start:kept.row_stop, kept.col_start:kept.col_stop]
    packed = geometry.feature_grid(size)
    row_sources = bilinear_sources(kept.row_stop - kept.row_start, packed.rows).float()
    col_sources = bilinear_sources(kept.col_stop - kept.col_start, packed.cols).float()
    tiles = (row_sources @ tiles.float() @ col_sources.T) > 0
    no, yes = (torch.full((tiles.shape[0], 1), v, dtype=torch.bool) for v in (False, True))
    related = torch.cat([base, torch.cat([tiles, no], dim=1).flatten()])
    newline = torch.cat([torch.zeros_like(base),
                         torch.cat([torch.zeros_like(tiles), yes], dim=1).flatten()])
    return related, newline


def anyres_related_positions(
    boxes: Iterable[tuple[float, float, float, float]], image_size: SizeOrPair,
    grid_info: Any, *, mode: str | None = None,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """``(related, other)`` image positions of one image, counted from its first image position.

    ``boxes`` are ``(x, y, w, h)`` in pixels of the original image, of size ``image_size``;
    newline positions are in neither. ``mode="pad"`` means the image was padded to a square
    before the processor saw it (``prepare(..., preprocessing="pad")``); any other mode means
    the processor's own anyres tiling.
    """
    boxes = list(boxes)
    size = as_image_size(image_size)
    if mode == "pad":
        side = max(size.width, size.height)
        shift_x, shift_y = (side - size.width) // 2, (side - size.height) // 2
        boxes = [(x + shift_x, y + shift_y, w, h) for x, y, w, h in boxes]
        size = ImageSize(side, side)
    related, newline = anyres_masks(boxes, size, grid_info)
    return related.nonzero().flatten(), (~related & ~newline).nonzero().flatten()


def add_anyres_spans(model: InputsModel, batch: Any) -> None:
    """Split every example's ``image`` span into ``image_base``, ``image_tiles`` (kept
    high-resolution features) and ``image_newline``."""
    geometry = AnyresGeometry.from_config(model.cfg)
    sizes = read_image_sizes(batch.image_sizes, len(batch))
    span_kinds = {"image_base": "base", "image_tiles": "tile", "image_newline": "newline"}
    spans: dict[str, list[Tensor]] = {name: [] for name in span_kinds}
    for i, size in enumerate(sizes):
        image = batch.positions("image", i)
        kinds = [p.kind for p in image_position_map(size, geometry)]
        if len(kinds) != len(image):
            raise ValueError(
                f"example {i} has {len(image)} image tokens but an image of {size} "
                f"gives {len(kinds)} image positions under the model's grid pinpoints: does the "
                "processor use the same image_grid_pinpoints and tile size as the model?")
        for name, kind in span_kinds.items():
            spans[name].append(image[torch.tensor([k == kind for k in kinds])])
    for name, positions in spans.items():
        batch.add_span(name, positions)
