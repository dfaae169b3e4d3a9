"""Where each anyres image position comes from (LLaVA-NeXT, LLaVA-OneVision), and the spans
built on that.

For one image, ``image_position_map`` lists every image position in input order with its
kind (``"base"``, ``"tile"`` or ``"newline"``), the tile and patch it holds and the pixel box it
covers in the original image. ``anyres_related_positions`` pushes object boxes through the same
tiling and unpadding. Sizes here are ``(width, height)`` like PIL's ``Image.size`` and
``mmlens.inputs.geometry``; the processor's ``image_sizes`` rows are ``(height, width)``.

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

from mmlens.inputs.geometry import CornerBox, canvas_patch_mask, corner_box, scale_and_shift
from mmlens.inputs.protocol import InputsModel
from mmlens.inputs.tiling import AnyresGeometry, bilinear_sources, image_sizes_list

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
    image_size: tuple[int, int], geometry: AnyresGeometry
) -> tuple[tuple[Fraction, Fraction], tuple[int, int], tuple[int, int]]:
    """``(scale, paste, canvas)`` placing original pixels on the tiled canvas.

    ``canvas_x = x * scale_x + paste_x``; ``canvas`` is ``(width, height)``. The resized size
    follows the processor: the limiting side fills the canvas, the other is rounded up.
    """
    width, height = image_size
    canvas_h, canvas_w = geometry.canvas((height, width))
    if canvas_w / width < canvas_h / height:
        new_w, new_h = canvas_w, min(math.ceil(height * (canvas_w / width)), canvas_h)
    else:
        new_w, new_h = min(math.ceil(width * (canvas_h / height)), canvas_w), canvas_h
    scale = (Fraction(new_w, width), Fraction(new_h, height))
    return scale, ((canvas_w - new_w) // 2, (canvas_h - new_h) // 2), (canvas_w, canvas_h)


def _to_image(canvas_box: CornerBox, scale: tuple[Fraction, Fraction], shift: tuple[int, int],
              image_size: tuple[int, int]) -> PixelBox:
    """A canvas box back in original pixels, clipped to the image."""
    x0, y0, x1, y1 = canvas_box
    bounds = (image_size[0], image_size[1]) * 2
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


def image_position_map(image_size: tuple[int, int], grid_info: Any) -> list[ImagePosition]:
    """Every image position of one image, in input order.

    ``image_size`` is the original ``(width, height)``; ``grid_info`` an ``AnyresGeometry`` or
    the model's config. ``len(result) == geometry.n_image_tokens((height, width))``.
    """
    geometry = _geometry(grid_info)
    width, height = image_size
    grid, patch, tile = geometry.grid, geometry.patch_size, geometry.tile_size
    base_scale = (Fraction(tile, width), Fraction(tile, height))
    positions = [
        ImagePosition("base", -1, -1, r, c, _to_image(
            (c * patch, r * patch, (c + 1) * patch, (r + 1) * patch), base_scale, (0, 0),
            image_size))
        for r in range(grid) for c in range(grid)
    ]
    scale, paste, _ = tile_transform(image_size, geometry)
    row0, row1, col0, col1 = geometry.kept_region((height, width))
    boxes = [[_to_image(_canvas_patch_box(row, col, geometry), scale, paste, image_size)
              for col in range(col0, col1)] for row in range(row0, row1)]
    rows, cols = geometry.feature_grid((height, width))
    row_sources = bilinear_sources(row1 - row0, rows)
    col_sources = bilinear_sources(col1 - col0, cols)
    for r in range(rows):
        src_rows = row_sources[r].nonzero().flatten().tolist()
        row = row0 + src_rows[0]
        for c in range(cols):
            src_cols = col_sources[c].nonzero().flatten().tolist()
            col = col0 + src_cols[0]
            box = _union([boxes[i][j] for i in src_rows for j in src_cols])
            positions.append(ImagePosition("tile", row // grid, col // grid, row % grid,
                                           col % grid, box))
        positions.append(ImagePosition("newline", row // grid, -1, row % grid, -1, None))
    return positions


def anyres_masks(
    boxes: Iterable[tuple[float, float, float, float]], image_size: tuple[int, int],
    grid_info: Any,
) -> tuple[torch.BoolTensor, torch.BoolTensor]:
    """``(related, newline)`` bool masks over one image's positions ``[n_image_tokens]``.

    ``boxes`` are ``(x, y, w, h)`` in original pixels; a position is related when its patch
    holds any pixel of any box (in the base tile or in a high-resolution tile).
    """
    geometry = _geometry(grid_info)
    width, height = image_size
    corners = [corner_box(box) for box in boxes]
    tile = geometry.tile_size
    base_scale = (Fraction(tile, width), Fraction(tile, height))
    base = canvas_patch_mask([scale_and_shift(c, base_scale) for c in corners], (tile, tile),
                             geometry.patch_size)
    scale, paste, canvas = tile_transform(image_size, geometry)
    on_canvas = [scale_and_shift(c, scale, paste) for c in corners]
    tile_rows, tile_cols = canvas[1] // tile, canvas[0] // tile
    tiles = torch.cat([torch.cat([
        canvas_patch_mask([scale_and_shift(c, (1, 1), (-tc * tile, -tr * tile))
                           for c in on_canvas], (tile, tile), geometry.patch_size)
        .view(geometry.grid, geometry.grid) for tc in range(tile_cols)], dim=1)
        for tr in range(tile_rows)])
    row0, row1, col0, col1 = geometry.kept_region((height, width))
    tiles = tiles[row0:row1, col0:col1]
    rows, cols = geometry.feature_grid((height, width))
    row_sources = bilinear_sources(row1 - row0, rows).float()
    col_sources = bilinear_sources(col1 - col0, cols).float()
    tiles = (row_sources @ tiles.float() @ col_sources.T) > 0
    no, yes = (torch.full((tiles.shape[0], 1), v, dtype=torch.bool) for v in (False, True))
    related = torch.cat([base, torch.cat([tiles, no], dim=1).flatten()])
    newline = torch.cat([torch.zeros_like(base),
                         torch.cat([torch.zeros_like(tiles), yes], dim=1).flatten()])
    return related, newline


def anyres_related_positions(
    boxes: Iterable[tuple[float, float, float, float]], image_size: tuple[int, int],
    grid_info: Any, *, mode: str | None = None,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """``(related, other)`` image positions of one image, counted from its first image position.

    ``boxes`` are ``(x, y, w, h)`` in pixels of the original ``image_size = (width, height)``;
    newline positions are in neither. ``mode="pad"`` means the image was padded to a square
    before the processor saw it (``prepare(..., preprocessing="pad")``); any other mode means
    the processor's own anyres tiling.
    """
    boxes = list(boxes)
    if mode == "pad":
        width, height = image_size
        side = max(width, height)
        shift_x, shift_y = (side - width) // 2, (side - height) // 2
        boxes = [(x + shift_x, y + shift_y, w, h) for x, y, w, h in boxes]
        image_size = (side, side)
    related, newline = anyres_masks(boxes, image_size, grid_info)
    return related.nonzero().flatten(), (~related & ~newline).nonzero().flatten()


def add_anyres_spans(model: InputsModel, batch: Any) -> None:
    """Split every example's ``image`` span into ``image_base``, ``image_tiles`` (kept
    high-resolution features) and ``image_newline``."""
    geometry = AnyresGeometry.from_config(model.cfg)
    sizes = image_sizes_list(batch.image_sizes, len(batch))
    span_kinds = {"image_base": "base", "image_tiles": "tile", "image_newline": "newline"}
    spans: dict[str, list[Tensor]] = {name: [] for name in span_kinds}
    for i, (height, width) in enumerate(sizes):
        image = batch.positions("image", i)
        kinds = [p.kind for p in image_position_map((width, height), geometry)]
        if len(kinds) != len(image):
            raise ValueError(
                f"example {i} has {len(image)} image tokens but an image of {height}x{width} "
                f"gives {len(kinds)} image positions under the model's grid pinpoints: does the "
                "processor use the same image_grid_pinpoints and tile size as the model?")
        for name, kind in span_kinds.items():
            spans[name].append(image[torch.tensor([k == kind for k in kinds])])
    for name, positions in spans.items():
        batch.add_span(name, positions)
