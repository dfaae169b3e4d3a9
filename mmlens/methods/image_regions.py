"""Image regions for causal maps: each image token's place on its grid and its pixel box, and
groups of neighbouring tokens.

    cells = image_token_cells(model, batch, 0, image_size)        # one TokenCell per image token
    regions = grid_regions(cells, cell=2)                           # 2x2 neighbouring tokens

Every family's cells come from the image-token map (``mmlens.inputs.token_map``, one per
image in ``batch.token_maps``): a token's grid is the one it was cut from
(``ImageTokenMap.grid_places``): LLaVA-1.5's ``grid x grid`` patches, Gemma 3's pooled cells,
PaliGemma's patches, Qwen-VL's merged cells (tile 0); LLaVA-NeXT / OneVision's base tile
(tile 0) and the packed high-resolution feature grid of all the tiles (tile 1; newline tokens
belong to no region); InternVL's and Idefics3's tiles, then the thumbnail / global view, each
its own grid; Llama-3.2-Vision's tiles of cross-attention keys (``position`` is then the key's
index, not a prompt position). Pixel boxes are the map's: half-open ``(x0, y0, x1, y1)`` in
pixels of the original image, clipped to it, the same geometry ``prepare`` maps object boxes
with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mmlens.core.errors import MMLensError
from mmlens.core.sizes import ImageSize, SizeOrPair, as_image_size
from mmlens.inputs.token_map import ImageTokenMap, check_token_count

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
    preprocessing it went through (default: the family's, as ``prepare`` chooses it). Read
    off the example's image-token map (``batch.token_maps``, or the family's layout for a
    batch ``prepare`` did not build): each token's grid and place (``grid_places``) and its
    pixel box.
    """
    size = as_image_size(image_size, "image size")
    image = batch.positions("image", example)
    token_map = _token_map(model, batch, example, size, mode)
    if model.cfg.text.cross_attention_layers:  # the image's tokens are cross-attention keys
        image = torch.arange(len(token_map), device=image.device)
    check_token_count(token_map, len(image), "the example")
    return [TokenCell(position, *place, token_map.pixel_box(k))
            for k, (position, place) in enumerate(zip(image.tolist(), token_map.grid_places(),
                                                      strict=True))
            if place is not None]


def _token_map(model: Any, batch: Any, example: int, size: ImageSize,
               mode: str | None) -> ImageTokenMap:
    """The map ``prepare`` built for the example's image when it is of this size and mode,
    else the family's layout's."""
    maps = batch.token_maps[example] if batch.token_maps else []
    if maps and maps[0].image_size == size and mode in (None, maps[0].mode):
        return maps[0]
    layout = model.family.image_layout(model)
    if layout is None:
        raise MMLensError(f"{model.family.name} declares no image layout "
                          "(Family.image_layout): its image tokens have no place on a grid")
    return layout.token_map(size, model.family.preprocessing_mode(model, mode))


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
