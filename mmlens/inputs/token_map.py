"""The image-token map: what every image token of one image is made from.

    token_map = layout.token_map(ImageSize(640, 480), mode="pad")
    token_map.tokens[k]       # TokenPlace(kind, tile, row, col, patches, box) of image token k
    token_map.related(boxes)  # bool [n_tokens]: tokens whose patches see a pixel of a box

``prepare`` builds one map per image (``batch.token_maps``) from the layout its model's family
declares (``Family.image_layout``); the ``related`` / ``other`` spans, the vision-tower spans
(``batch.vision_positions``), the paper's pixel rule, the example views and the vision
knockouts' position checks all read it. Nothing else maps image tokens to tower patches or
pixels.

A token's ``patches`` are ``(tile, index)`` pairs: ``tile`` the row of this image's tiles in
the vision tower (0 for a one-tile image and for a packed tower; LLaVA-NeXT: 0 the base tile,
then the high-resolution tiles row by row) and ``index`` the position in that tower row, the
class-token offset included (``class_offset``: 1 for CLIP, whose rows start with the class
token, 0 for SigLIP and Qwen-VL). Every patch has a box in the original image's pixels, exact
(``Fraction``) and half-open, clipped to the image (empty where the patch sees only padding). A
token is related to an object box when any of its patches holds a pixel of the box; its own
``box`` is the union of its patches' boxes.

One module per layout, each an ``ImageLayout``: ``layouts.grid`` (a square crop, with or
without a class token: LLaVA-1.5), ``layouts.anyres`` (base tile, tiles, newlines and the
anyres-max downscale: LLaVA-NeXT / OneVision), ``layouts.merged`` (merged cells of a dynamic
resolution: Qwen-VL). A new layout (pixel shuffle with tiles and a thumbnail, cross-attention
towers) adds a module and its token kinds; the consumers above need no change.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from numbers import Rational
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mmlens.core.errors import MMLensError
from mmlens.core.sizes import ImageSize
from mmlens.data.example import Box

KINDS: tuple[str, ...] = ("cell", "class", "base", "tile", "newline", "merged", "thumbnail",
                          "separator")
"""Token kinds: ``cell`` a patch feature of a single crop, ``class`` a class-token feature,
``base`` / ``tile`` a feature of an anyres base / high-resolution tile, ``newline`` a learned
row end, ``merged`` a cell of merged patches; ``thumbnail`` / ``separator`` are kept for the
coming layouts (pixel shuffle with a thumbnail tile, learned separators)."""

CornerBox = tuple[Rational, Rational, Rational, Rational]
"""A box as exact half-open corners ``(x0, y0, x1, y1)``: it covers ``[x0, x1) x [y0, y1)``
(ints or ``Fraction``s: exact rationals)."""


def corner_box(box: Box) -> CornerBox:
    """GQA's ``(x, y, w, h)`` as exact corners ``(x0, y0, x1, y1)``."""
    x, y, w, h = (Fraction(v) for v in box)
    if w < 0 or h < 0:
        raise ValueError(f"box {tuple(box)} has a negative width or height: boxes are (x, y, w, h)")
    return (x, y, x + w, y + h)


PatchRef = tuple[int, int]
"""``(tile, index)``: the tower row of this image's tile and the position in it."""


@dataclass(frozen=True)
class TokenPlace:
    """One image token. ``tile`` -1, ``row`` / ``col`` -1 where they do not apply (a newline
    keeps the row of the feature row it ends); ``box`` None for a token no pixel reaches."""

    kind: str
    tile: int
    row: int
    col: int
    patches: tuple[PatchRef, ...]
    box: CornerBox | None

    @property
    def pixel_box(self) -> tuple[float, float, float, float] | None:
        """``box`` as floats ``(x0, y0, x1, y1)``."""
        return None if self.box is None else tuple(float(v) for v in self.box)


@dataclass(frozen=True)
class ImageTokenMap:
    """Every image token of one image, in input order (see the module docstring).

    ``n_tiles``: the vision-tower rows the image runs as (a packed tower: 1, its patches in
    the processor's order); ``tower_length``: positions in each row (class token included;
    a packed tower: this image's patches); ``packed``: whether every image of a call shares
    one tower row (Qwen-VL), so ``index`` counts from the image's first patch in that row.
    """

    image_size: ImageSize
    mode: str | None
    tokens: tuple[TokenPlace, ...]
    patch_boxes: dict[PatchRef, CornerBox]
    n_tiles: int
    tower_length: int
    class_offset: int
    packed: bool = False

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def kinds(self) -> list[str]:
        return [t.kind for t in self.tokens]

    def sees_pixels(self) -> Bool[Tensor, " n_tokens"]:
        """Tokens made from patches (not a class token, a newline or a separator)."""
        return torch.tensor([any(p in self.patch_boxes for p in t.patches)
                             for t in self.tokens], dtype=torch.bool)

    def related_patches(self, boxes: Iterable[Box]) -> set[PatchRef]:
        """Patches holding a pixel of any box; ``boxes`` are ``(x, y, w, h)`` in the original
        image's pixels (half-open, exact: a box ending on a patch border stays out of the
        next patch; an empty box touches nothing)."""
        corners = [c for c in (corner_box(b) for b in boxes) if c[2] > c[0] and c[3] > c[1]]
        return {ref for ref, (x0, y0, x1, y1) in self.patch_boxes.items()
                if x1 > x0 and y1 > y0 and any(
                    bx0 < x1 and bx1 > x0 and by0 < y1 and by1 > y0
                    for bx0, by0, bx1, by1 in corners)}

    def related(self, boxes: Iterable[Box]) -> Bool[Tensor, " n_tokens"]:
        """Tokens any of whose patches holds a pixel of any box."""
        return self.tokens_of(self.related_patches(boxes))

    def tokens_of(self, patches: set[PatchRef]) -> Bool[Tensor, " n_tokens"]:
        """Tokens made from at least one of ``patches`` (e.g. the pixel rule's red patches)."""
        return torch.tensor([any(p in patches for p in t.patches) for t in self.tokens],
                            dtype=torch.bool)

    def tower_positions(self, tokens: Sequence[int]) -> list[list[int]]:
        """The tower patches of image tokens ``tokens``: one sorted list per tile."""
        per_tile: list[set[int]] = [set() for _ in range(self.n_tiles)]
        for k in tokens:
            for tile, index in self.tokens[k].patches:
                per_tile[tile].add(index)
        return [sorted(p) for p in per_tile]


class ImageLayout:
    """How a family's processor and vision tower turn one image into image tokens.

    ``class_token``: the tower's rows start with a class token; ``packed``: every image of a
    call is one tower row (no fixed length); ``tower_length``: positions of one tower row
    (class token included), None when packed; ``cell_px``: side, in pixels of the tile the
    tower sees, of the square one view cell (a ``row``/``col`` of tile 0) covers.
    """

    class_token: bool = False
    packed: bool = False

    @property
    def class_offset(self) -> int:
        return 1 if self.class_token else 0

    @property
    def tower_length(self) -> int | None:
        raise NotImplementedError

    @property
    def cell_px(self) -> int:
        raise NotImplementedError

    def token_map(self, image_size: ImageSize, mode: str | None = None) -> ImageTokenMap:
        """The map of an image of ``image_size`` preprocessed by ``mode`` (``"pad"`` /
        ``"resize_crop"`` / ``"resize"`` where the layout has a choice; None: the
        processor's)."""
        raise NotImplementedError

    def input_maps(self, batch: Any) -> list[list[ImageTokenMap]]:
        """Maps read off the model inputs alone (for a batch ``prepare`` did not build): its
        boxes are in pixels of what the processor produced, its patches are exact."""
        raise NotImplementedError

    def view_pixels(self, batch: Any, example: int) -> Float[Tensor, "3 height width"]:
        """The pixels tile 0 of example ``example``'s image shows the tower, still
        normalised (what an example view draws)."""
        raise NotImplementedError


def patch_box(canvas_box: CornerBox, scale: tuple[Rational, Rational],
              shift: tuple[Rational, Rational], size: ImageSize) -> CornerBox:
    """A box of the canvas the tower sees back in original pixels, clipped to the image:
    the inverse of ``canvas = original * scale + shift``."""
    x0, y0, x1, y1 = canvas_box
    mapped = ((x0 - shift[0]) / scale[0], (y0 - shift[1]) / scale[1],
              (x1 - shift[0]) / scale[0], (y1 - shift[1]) / scale[1])
    bounds = (size.width, size.height) * 2
    return tuple(min(max(Fraction(v), Fraction(0)), Fraction(bound))
                 for v, bound in zip(mapped, bounds, strict=True))


def union_box(boxes: Sequence[CornerBox]) -> CornerBox:
    """The smallest box holding every non-empty box (the first box when all are empty)."""
    filled = [b for b in boxes if b[2] > b[0] and b[3] > b[1]] or list(boxes[:1])
    return (min(b[0] for b in filled), min(b[1] for b in filled),
            max(b[2] for b in filled), max(b[3] for b in filled))


def check_token_count(token_map: ImageTokenMap, n_image_tokens: int, where: str) -> None:
    """Raise when the prompt's image tokens are not the map's."""
    if len(token_map) != n_image_tokens:
        raise MMLensError(
            f"{where} has {n_image_tokens} image tokens but an image of {token_map.image_size} "
            f"gives {len(token_map)} under the model's image layout: does the processor use the "
            "same tile size, grid pinpoints and patch size as the model?")


def build_token_maps(layout: ImageLayout | None, batch: Any, images: Sequence[Any],
                     mode: str | None) -> list[list[ImageTokenMap]] | None:
    """One map per image of every example (one image an example, ``images[i]`` the original
    of example ``i``), checked against the prompt's image tokens; None without a layout."""
    if layout is None:
        return None
    maps = []
    for i, image in enumerate(images):
        token_map = layout.token_map(ImageSize.of(image), mode)
        check_token_count(token_map, len(batch.positions("image", i)), f"example {i}")
        maps.append([token_map])
    return maps
