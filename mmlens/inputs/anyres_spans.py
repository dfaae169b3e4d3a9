"""Where each anyres image position comes from (LLaVA-NeXT, LLaVA-OneVision), and the spans
built on that.

Every function here reads the image's token map (``mmlens.inputs.layouts.anyres``, which
holds the geometry): ``image_position_map`` lists every image position in input order with its
kind (``"base"``, ``"tile"`` or ``"newline"``), the tile and patch it holds and the pixel box it
covers in the original image; ``anyres_related_positions`` gives the positions object boxes
touch. Sizes are ``ImageSize(width, height)``; a bare pair is read as
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

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from mmlens.core.sizes import SizeOrPair, as_image_size
from mmlens.inputs.layouts.anyres import AnyresLayout, tile_transform
from mmlens.inputs.tiling import AnyresGeometry
from mmlens.inputs.token_map import ImageTokenMap

__all__ = ["ImagePosition", "add_anyres_spans", "anyres_masks", "anyres_related_positions",
           "image_position_map", "tile_transform"]

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
    return grid_info if isinstance(grid_info, AnyresGeometry) else (
        AnyresGeometry.from_config(grid_info))


def _map(image_size: SizeOrPair, grid_info: Any, mode: str | None = None) -> ImageTokenMap:
    """The token map of one image; ``grid_info`` an ``AnyresGeometry`` or the model's config."""
    layout = AnyresLayout(_geometry(grid_info), class_token=False)
    return layout.token_map(as_image_size(image_size), mode)


def image_position_map(image_size: SizeOrPair, grid_info: Any) -> list[ImagePosition]:
    """Every image position of one image, in input order.

    ``image_size`` is the original image's size; ``grid_info`` an ``AnyresGeometry`` or the
    model's config. ``len(result) == geometry.n_image_tokens(image_size)``.
    """
    token_map = _map(image_size, grid_info)
    n_cols = _geometry(grid_info).tile_grid(token_map.image_size).cols
    out = []
    for k, token in enumerate(token_map.tokens):
        tile_row, tile_col = divmod(token.tile - 1, n_cols) if token.tile > 0 else (-1, -1)
        if token.kind == "newline":
            tile_col = -1
        out.append(ImagePosition(token.kind, tile_row, tile_col, token.row, token.col,
                                 token_map.pixel_box(k)))
    return out


def anyres_masks(
    boxes: Iterable[tuple[float, float, float, float]], image_size: SizeOrPair, grid_info: Any,
) -> tuple[torch.BoolTensor, torch.BoolTensor]:
    """``(related, newline)`` bool masks over one image's positions ``[n_image_tokens]``.

    ``boxes`` are ``(x, y, w, h)`` in original pixels; a position is related when a patch it
    is made from holds any pixel of any box (in the base tile or in a high-resolution tile).
    """
    token_map = _map(image_size, grid_info)
    newline = torch.tensor([k == "newline" for k in token_map.kinds], dtype=torch.bool)
    return token_map.related(boxes), newline


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
    token_map = _map(image_size, grid_info, "pad" if mode == "pad" else None)
    related = token_map.related(boxes)
    return related.nonzero().flatten(), (~related & token_map.sees_pixels()).nonzero().flatten()


def add_anyres_spans(model: Any, batch: Any) -> None:
    """Split every example's ``image`` span into ``image_base``, ``image_tiles`` (kept
    high-resolution features) and ``image_newline``, by the kinds of its image's tokens."""
    span_kinds = {"image_base": "base", "image_tiles": "tile", "image_newline": "newline"}
    spans: dict[str, list[Tensor]] = {name: [] for name in span_kinds}
    for i, maps in enumerate(batch.token_maps):
        image = batch.positions("image", i)
        kinds = [kind for token_map in maps for kind in token_map.kinds]
        for name, kind in span_kinds.items():
            spans[name].append(image[torch.tensor([k == kind for k in kinds],
                                                  dtype=torch.bool)])
    for name, positions in spans.items():
        batch.add_span(name, positions)
