"""Image regions for causal maps: each image token's place on its grid and its pixel box, and
groups of neighbouring tokens.

    cells = image_token_cells(model, batch, 0, image_size)        # one TokenCell per image token
    regions = grid_regions(cells, cell=2)                           # 2x2 neighbouring tokens

A token's grid is the one it was cut from: LLaVA-1.5's ``grid x grid`` patches, Gemma 3's
pooled cells, PaliGemma's patches (tile 0, from the family's image-token map);
LLaVA-NeXT / OneVision's base tile (tile 0) and the packed high-resolution feature grid of
all the tiles (tile 1; newline tokens belong to no region); Qwen-VL's merged cells of the
resized image (tile 0); InternVL's and Idefics3's tiles, then the thumbnail / global view,
each its own grid, from the image-token map. Pixel boxes are half-open ``(x0, y0, x1, y1)``
in pixels of the original image, clipped to it, from the geometry ``prepare`` maps object
boxes with (``mmlens.inputs.geometry``, ``anyres_spans``, ``qwen_geometry``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from mmlens.core.errors import MMLensError
from mmlens.core.sizes import ImageSize, SizeOrPair, as_image_size

PixelBox = tuple[float, float, float, float]


@dataclass(frozen=True)
class TokenCell:
    """One image token: its sequence ``position``, its grid (``tile``) and place on it
    (``row``, ``col``), and the ``box`` of original-image pixels it covers."""

    position: int
    tile: int
    row: int
    col: int
    box: PixelBox


@dataclass(frozen=True)
class Region:
    """Image tokens knocked out (or patched) together; ``row`` / ``col`` are the top-left
    token's, ``box`` the smallest box holding every token's box."""

    label: str
    positions: Tensor
    tile: int
    row: int
    col: int
    box: PixelBox


def original_size(batch: Any, images: Sequence[Any] | None, example: int) -> SizeOrPair:
    """The size of the image ``example`` was prepared from: ``images[example]`` (an image, or a
    ``(width, height)`` size), else the batch's example record's image."""
    if images is not None:
        if len(images) != len(batch):
            raise MMLensError(f"images gives {len(images)} images for {len(batch)} examples: "
                              "give one per example")
        image = images[example]
        return image if isinstance(image, tuple) else ImageSize.of(image)
    if batch.examples:
        return ImageSize.of(batch.examples[example].load_image())
    raise MMLensError("the regions' pixel boxes need the original images' sizes: pass images= "
                      "(the images, or (width, height) sizes, given to model.prepare)")


def image_token_cells(model: Any, batch: Any, example: int, image_size: SizeOrPair,
                      mode: str | None = None) -> list[TokenCell]:
    """Every image token of ``example`` that covers pixels, in input order.

    ``image_size``: the original image's size (as given to ``prepare``); ``mode``: the
    preprocessing it went through (default: the family's, as ``prepare`` chooses it).
    """
    size = as_image_size(image_size, "image size")
    image = batch.positions("image", example)
    if model.cfg.text.cross_attention_layers:  # the image's tokens are cross-attention keys
        layout = model.family.image_layout(model)
        return _map_cells(model, torch.arange(len(layout.token_map(size, mode))), size, mode)
    geometry = model.family.fixed_preprocessing  # the family says how its processor tiles
    if geometry == "anyres":
        from mmlens.inputs.layouts.anyres import AnyresLayout

        if not isinstance(model.family.image_layout(model), AnyresLayout):  # another tiling
            return _map_cells(model, image, size, mode)
        return _anyres_cells(model, image, size, mode)
    if geometry == "dynamic":
        return _qwen_cells(model, batch, example, image, size)
    if geometry == "tiles":
        return _map_cells(model, image, size, mode)
    return _fixed_cells(model, image, size, mode)


def _fixed_cells(model: Any, image: Tensor, size: ImageSize, mode: str | None) -> list[TokenCell]:
    """A one-tile layout (LLaVA-1.5's grid, Gemma 3's pooled grid, PaliGemma's): the tokens
    with a place on tile 0 of the image's token map (a class feature has none)."""
    layout = model.family.image_layout(model)
    if layout is None:
        raise MMLensError(f"{model.family.name} declares no image layout "
                          "(Family.image_layout): its image tokens have no place on a grid")
    token_map = layout.token_map(size, model.family.preprocessing_mode(model, mode))
    if len(image) != len(token_map):
        raise MMLensError(f"the example has {len(image)} image tokens but the model's image "
                          f"layout gives {len(token_map)}: prepare the batch with this model "
                          "(model.prepare)")
    _, _, placed = token_map.grid_cells(0)
    return [TokenCell(int(image[k]), 0, token_map.tokens[k].row, token_map.tokens[k].col,
                      token_map.pixel_box(k)) for k in placed]


def _anyres_cells(model: Any, image: Tensor, size: ImageSize,
                  mode: str | None) -> list[TokenCell]:
    from mmlens.inputs.anyres_spans import image_position_map

    canvas, shift = size, (0, 0)
    if mode == "pad":  # prepare padded the image to a square before the processor saw it
        side = max(size.width, size.height)
        canvas = ImageSize(side, side)
        shift = ((side - size.width) // 2, (side - size.height) // 2)
    positions = image_position_map(canvas, model.cfg)
    if len(positions) != len(image):
        raise MMLensError(f"the example has {len(image)} image tokens but an image of {size} "
                          f"gives {len(positions)} under the model's tiling: pass the size of "
                          "the image given to prepare (and its preprocessing)")
    cells, packed_row, packed_col = [], 0, 0
    for position, where in zip(image.tolist(), positions, strict=True):
        if where.kind == "newline":  # ends a row of the packed high-resolution grid
            packed_row, packed_col = packed_row + 1, 0
            continue
        box = _to_original(where.box, (1, 1), shift, size)
        if where.kind == "base":
            cells.append(TokenCell(position, 0, where.patch_row, where.patch_col, box))
            continue
        cells.append(TokenCell(position, 1, packed_row, packed_col, box))
        packed_col += 1
    return cells


def _map_cells(model: Any, image: Tensor, size: ImageSize, mode: str | None) -> list[TokenCell]:
    """Through the family's image-token map (``mmlens.inputs.token_map``): each tile its grid."""
    from mmlens.inputs.token_map import check_token_count

    token_map = model.family.image_layout(model).token_map(size, mode)
    check_token_count(token_map, len(image), "the example")
    return [TokenCell(int(position), place.tile, place.row, place.col, token_map.pixel_box(k))
            for k, (position, place) in enumerate(zip(image.tolist(), token_map.tokens,
                                                      strict=True))
            if place.row >= 0 and place.col >= 0 and place.patches]


def _qwen_cells(model: Any, batch: Any, example: int, image: Tensor,
                size: ImageSize) -> list[TokenCell]:
    vision = model.cfg.vision
    t, grid_h, grid_w = (int(n) for n in torch.as_tensor(batch.image_sizes).reshape(-1, 3)[
        example])
    rows, cols = grid_h // vision.merge_size, grid_w // vision.merge_size
    if t != 1 or len(image) != rows * cols:
        raise MMLensError(f"the example has {len(image)} image tokens but image_grid_thw "
                          f"{[t, grid_h, grid_w]} merges into {t}x{rows}x{cols}: a causal map "
                          "needs one still image per example, prepared with this model")
    side = vision.token_size
    scale = (Fraction(grid_w * vision.patch_size, size.width),
             Fraction(grid_h * vision.patch_size, size.height))
    return [TokenCell(int(image[r * cols + c]), 0, r, c, _to_original(
        (c * side, r * side, (c + 1) * side, (r + 1) * side), scale, (0, 0), size))
        for r in range(rows) for c in range(cols)]


def _to_original(canvas_box: tuple[Any, Any, Any, Any], scale: tuple[Any, Any],
                 shift: tuple[Any, Any], size: ImageSize) -> PixelBox:
    """A box on the canvas the tower sees, back in original pixels (inverse of
    ``x * scale + shift``), clipped to the image."""
    x0, y0, x1, y1 = canvas_box
    mapped = ((x0 - shift[0]) / scale[0], (y0 - shift[1]) / scale[1],
              (x1 - shift[0]) / scale[0], (y1 - shift[1]) / scale[1])
    bounds = (size.width, size.height) * 2
    return tuple(float(min(max(v, 0), bound)) for v, bound in zip(mapped, bounds, strict=True))


def grid_regions(cells: Sequence[TokenCell], cell: int = 1) -> list[Region]:
    """``cell`` x ``cell`` blocks of neighbouring tokens on each grid (edge blocks smaller)."""
    if not isinstance(cell, int) or cell < 1:
        raise MMLensError(f"cell must be a positive number of tokens per side, got {cell!r}")
    groups: dict[tuple[int, int, int], list[TokenCell]] = {}
    for token in cells:
        groups.setdefault((token.tile, token.row // cell, token.col // cell), []).append(token)
    return [_region(f"{tile}:{row},{col}", members) for (tile, row, col), members
            in groups.items()]


def span_regions(cells: Sequence[TokenCell], named: dict[str, Tensor]) -> list[Region]:
    """One region per name: the image tokens among its positions (e.g. a ``related`` span)."""
    by_position = {token.position: token for token in cells}
    regions = []
    for name, positions in named.items():
        members = [by_position[p] for p in positions.tolist() if p in by_position]
        if not members:
            raise MMLensError(f"region {name!r} holds no image token of this example: give "
                              "positions of image tokens (a span such as 'related')")
        regions.append(_region(name, members))
    return regions


def _region(label: str, members: list[TokenCell]) -> Region:
    boxes = [m.box for m in members]
    return Region(label, torch.tensor([m.position for m in members]), members[0].tile,
                  min(m.row for m in members), min(m.col for m in members),
                  (min(b[0] for b in boxes), min(b[1] for b in boxes),
                   max(b[2] for b in boxes), max(b[3] for b in boxes)))
