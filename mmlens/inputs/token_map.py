"""The image-token map: what every image token of one image is made from.

    token_map = layout.token_map(ImageSize(640, 480), mode="pad")
    token_map.tokens[k]       # TokenPlace(kind, tile, row, col, patches) of image token k
    token_map.box(k)          # its box in the original image's pixels (x0, y0, x1, y1)
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
token, 0 for SigLIP and Qwen-VL). Each tile has a ``TileFrame``: how the original pixels land
on it (scale and shift, exact ``Fraction``s), its patch grid and the tower order of its
patches. So every patch has a box in the original image's pixels, half-open, clipped to the
image (empty where the patch sees only padding); a token is related to an object box when any
of its patches holds a pixel of the box (the box is pushed forward through the frames, as the
pixels go), and its own box is the union of its patches' boxes.

One module per layout, each an ``ImageLayout``: ``layouts.grid`` (a square crop, with or
without a class token: LLaVA-1.5), ``layouts.anyres`` (base tile, tiles, newlines and the
anyres-max downscale: LLaVA-NeXT / OneVision), ``layouts.merged`` (merged cells of a dynamic
resolution: Qwen-VL), ``layouts.tiles`` (dynamic tiles plus a thumbnail, 2x2 pixel shuffle:
InternVL), ``layouts.cross_tiles`` (tiles whose patches are cross-attention keys, not prompt
tokens: Llama-3.2-Vision, ``ImageLayout.in_sequence`` False). A new layout adds a module and its
token kinds; the consumers above need no change.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property
from numbers import Rational, Real
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mmlens.core.errors import MMLensError
from mmlens.core.sizes import ImageSize, SizeOrPair, as_image_size
from mmlens.data.example import Box

KINDS: tuple[str, ...] = ("cell", "class", "base", "tile", "newline", "merged", "thumbnail",
                          "separator", "padding")
"""Token kinds: ``cell`` a patch feature of a single crop, ``class`` a class-token feature,
``base`` / ``tile`` a feature of an anyres base / high-resolution tile, ``newline`` a learned
row end, ``merged`` a cell of merged patches, ``thumbnail`` a feature of the whole image squashed to
one tile (InternVL); ``separator`` is kept for a coming layout (learned separators); ``padding``
a cross-attention key of a padding tile, made from no pixel (Llama-3.2-Vision)."""

CornerBox = tuple[Rational, Rational, Rational, Rational]
"""A box as exact half-open corners ``(x0, y0, x1, y1)``: it covers ``[x0, x1) x [y0, y1)``
(ints or ``Fraction``s: exact rationals)."""


def corner_box(box: Box) -> CornerBox:
    """GQA's ``(x, y, w, h)`` as exact corners ``(x0, y0, x1, y1)``."""
    x, y, w, h = (Fraction(v) for v in box)
    if w < 0 or h < 0:
        raise ValueError(f"box {tuple(box)} has a negative width or height: boxes are (x, y, w, h)")
    return (x, y, x + w, y + h)


def clip_box(box: CornerBox, size: ImageSize) -> CornerBox:
    """``box`` cut to the image ``[0, width) x [0, height)`` (maybe empty)."""
    x0, y0, x1, y1 = box
    return (max(x0, 0), max(y0, 0), min(x1, size.width), min(y1, size.height))


def scale_and_shift(
    box: CornerBox, scale: tuple[Real, Real], shift: tuple[Real, Real] = (0, 0)
) -> CornerBox:
    """Map corners with ``x -> x * scale_x + shift_x`` (same for y).

    Pass ``scale`` as ``Fraction(new_size, old_size)`` to keep patch borders exact.
    """
    sx, sy = Fraction(scale[0]), Fraction(scale[1])
    ox, oy = Fraction(shift[0]), Fraction(shift[1])
    x0, y0, x1, y1 = box
    return (x0 * sx + ox, y0 * sy + oy, x1 * sx + ox, y1 * sy + oy)


def canvas_patch_mask(
    boxes: Iterable[CornerBox], canvas_size: SizeOrPair, patch_size: int = 14
) -> torch.BoolTensor:
    """Patches of a canvas of ``canvas_size`` that overlap any box given in canvas coordinates.

    Boxes are clipped to the canvas; a box wholly outside it marks nothing. The patch grid is
    ``size // patch_size``: where the side is not a whole number of patches (SigLIP's 384-px
    tiles of 14-px patches cover 378 px), the convolution drops the last pixels, and a box
    there marks no patch. Returns a row-major mask of shape ``[grid_h * grid_w]``.
    """
    canvas = as_image_size(canvas_size, "canvas size")
    grid_w, grid_h = canvas.width // patch_size, canvas.height // patch_size
    if grid_w == 0 or grid_h == 0:
        raise ValueError(f"canvas {canvas} holds no whole "
                         f"{patch_size}-pixel patch: pass the size of the canvas the vision "
                         "tower sees")
    width, height = grid_w * patch_size, grid_h * patch_size  # the pixels the patches see
    mask = torch.zeros(grid_h, grid_w, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        x0, x1 = max(x0, 0), min(x1, width)
        y0, y1 = max(y0, 0), min(y1, height)
        if x1 <= x0 or y1 <= y0:
            continue
        # half-open: the last covered patch is the one holding the pixel just left of x1
        cols = slice(math.floor(x0 / patch_size), math.ceil(x1 / patch_size))
        rows = slice(math.floor(y0 / patch_size), math.ceil(y1 / patch_size))
        mask[rows, cols] = True
    return mask.flatten()


PatchRef = tuple[int, int]
"""``(tile, index)``: the tower row of this image's tile and the position in it."""


@dataclass(frozen=True)
class TileFrame:
    """How the original image lands on one tile the tower sees: ``canvas = original * scale +
    shift`` (x first), cut into ``patch`` px patches, ``grid_h x grid_w`` of them (pixels past
    the last whole patch are seen by none). The patch at ``(row, col)`` is at tower index
    ``offset + ((row // m) * (grid_w // m) + col // m) * m * m + (row % m) * m + col % m``
    with ``m = merge``: row-major for ``merge = 1``, merge-block order otherwise (Qwen-VL)."""

    scale: tuple[Rational, Rational]
    shift: tuple[Rational, Rational]
    patch: int
    grid_h: int
    grid_w: int
    offset: int = 0
    merge: int = 1

    def index(self, row: int, col: int) -> int:
        m = self.merge
        return self.offset + ((row // m) * (self.grid_w // m) + col // m) * m * m + (
            row % m) * m + col % m

    def place(self, index: int) -> tuple[int, int]:
        """``(row, col)`` of the patch at tower index ``index``."""
        m = self.merge
        block, inside = divmod(index - self.offset, m * m)
        block_row, block_col = divmod(block, self.grid_w // m)
        return block_row * m + inside // m, block_col * m + inside % m

    def patch_box(self, index: int, size: ImageSize) -> CornerBox:
        """The original pixels the patch at ``index`` sees, clipped to the image."""
        row, col = self.place(index)
        p = self.patch
        return patch_box((col * p, row * p, (col + 1) * p, (row + 1) * p), self.scale,
                         self.shift, size)


@dataclass(frozen=True)
class TokenPlace:
    """One image token. ``tile`` -1, ``row`` / ``col`` -1 where they do not apply (a newline
    keeps the tile and row of the feature row it ends); ``patches`` empty for a token no patch
    made (a newline)."""

    kind: str
    tile: int
    row: int
    col: int
    patches: tuple[PatchRef, ...]


@dataclass(frozen=True)
class ImageTokenMap:
    """Every image token of one image, in input order (see the module docstring).

    ``frames[t]``: how the image lands on tile ``t`` (``len(frames)`` tower rows; a packed
    tower: 1, its patches in the processor's order); ``tower_length``: positions in each row
    (class token included; a packed tower: this image's patches); ``packed``: whether every
    image of a call shares one tower row (Qwen-VL), so ``index`` counts from the image's first
    patch in that row. ``mode``: the preprocessing the map was built for. ``one_row``: every
    tile of the image is one tower row (Llama-3.2-Vision's tower attends across tiles), so
    ``tower_positions`` gives one list.
    """

    image_size: ImageSize
    mode: str | None
    tokens: tuple[TokenPlace, ...]
    frames: tuple[TileFrame, ...]
    tower_length: int
    class_offset: int
    packed: bool = False
    one_row: bool = False

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_tiles(self) -> int:
        return len(self.frames)

    @property
    def kinds(self) -> list[str]:
        return [t.kind for t in self.tokens]

    @cached_property
    def patch_boxes(self) -> dict[PatchRef, CornerBox]:
        """Every patch of every tile with its box in original pixels (empty where it sees only
        padding)."""
        return {(t, f.index(r, c)): f.patch_box(f.index(r, c), self.image_size)
                for t, f in enumerate(self.frames)
                for r in range(f.grid_h) for c in range(f.grid_w)}

    def box(self, token: int) -> CornerBox | None:
        """Token ``token``'s box in original pixels: the union of its patches' (None for a
        token no patch made), exact and half-open, clipped to the image."""
        patches = self.tokens[token].patches
        if not patches or self.tokens[token].kind == "class":
            return None
        return union_box([self.frames[t].patch_box(i, self.image_size) for t, i in patches])

    def pixel_box(self, token: int) -> tuple[float, float, float, float] | None:
        """``box(token)`` as floats."""
        box = self.box(token)
        return None if box is None else tuple(float(v) for v in box)

    def sees_pixels(self) -> Bool[Tensor, " n_tokens"]:
        """Tokens made from patches (not a class token, a newline or a separator)."""
        return torch.tensor([bool(t.patches) and t.kind != "class" for t in self.tokens],
                            dtype=torch.bool)

    def related_patches(self, boxes: Iterable[Box]) -> set[PatchRef]:
        """Patches holding a pixel of any box; ``boxes`` are ``(x, y, w, h)`` in the original
        image's pixels (half-open, exact: a box ending on a patch border stays out of the
        next patch; an empty box, or its part outside the image, touches nothing)."""
        corners = [clip_box(corner_box(b), self.image_size) for b in boxes]
        corners = [c for c in corners if c[2] > c[0] and c[3] > c[1]]
        refs: set[PatchRef] = set()
        if not corners:
            return refs
        for t, frame in enumerate(self.frames):
            canvas = ImageSize(frame.grid_w * frame.patch, frame.grid_h * frame.patch)
            mask = canvas_patch_mask([scale_and_shift(c, frame.scale, frame.shift)
                                      for c in corners], canvas, frame.patch)
            for k in mask.nonzero().flatten().tolist():
                refs.add((t, frame.index(*divmod(k, frame.grid_w))))
        return refs

    def related(self, boxes: Iterable[Box]) -> Bool[Tensor, " n_tokens"]:
        """Tokens any of whose patches holds a pixel of any box."""
        return self.tokens_of(self.related_patches(boxes))

    def tokens_of(self, patches: set[PatchRef]) -> Bool[Tensor, " n_tokens"]:
        """Tokens made from at least one of ``patches`` (e.g. the pixel rule's red patches)."""
        return torch.tensor([any(p in patches for p in t.patches) for t in self.tokens],
                            dtype=torch.bool)

    def grid_cells(self, tile: int = 0) -> tuple[int, int, list[int]]:
        """``(rows, cols, tokens)``: the tokens of tile ``tile`` that have a place on its grid
        (a class token or a newline has none), row-major, and the grid's shape."""
        cells = [k for k, t in enumerate(self.tokens)
                 if t.tile == tile and t.row >= 0 and t.col >= 0]
        rows = 1 + max(self.tokens[k].row for k in cells)
        cols = 1 + max(self.tokens[k].col for k in cells)
        if len(cells) != rows * cols:
            raise ValueError(f"tile {tile} has {len(cells)} tokens on a {rows}x{cols} grid: "
                             "its tokens do not cover the grid once (an unpadded or "
                             "downscaled tile?)")
        return rows, cols, cells

    def grid_places(self) -> list[tuple[int, int, int] | None]:
        """Per token, ``(grid, row, col)``: the grid a map of the image draws it on and its
        place there; None for a token that sees no pixels (a class token, a newline). Each
        tile is its own grid, except features whose rows end in newlines (anyres), which are
        drawn packed as the decoder reads them: grid 1, a row per newline."""
        packed = "newline" in self.kinds
        places: list[tuple[int, int, int] | None] = []
        row, col = 0, 0
        for token in self.tokens:
            if token.kind == "newline":
                row, col = row + 1, 0
            if not token.patches or token.kind == "class" or token.row < 0 or token.col < 0:
                places.append(None)
            elif packed and token.kind == "tile":
                places.append((1, row, col))
                col += 1
            else:
                places.append((token.tile, token.row, token.col))
        return places

    def tower_positions(self, tokens: Sequence[int]) -> list[list[int]]:
        """The tower patches of image tokens ``tokens``: one sorted list per tile."""
        per_tile: list[set[int]] = [set() for _ in range(self.n_tiles)]
        for k in tokens:
            for tile, index in self.tokens[k].patches:
                per_tile[tile].add(index)
        if self.one_row:
            return [sorted(set().union(*per_tile))]
        return [sorted(p) for p in per_tile]


class ImageLayout:
    """How a family's processor and vision tower turn one image into image tokens.

    ``class_token``: the tower's rows start with a class token; ``packed``: every image of a
    call is one tower row (no fixed length); ``tower_length``: positions of one tower row
    (class token included), None when packed; ``cell_px``: side, in pixels of the tile the
    tower sees, of the square one view cell (a ``row``/``col`` of tile 0) covers;
    ``in_sequence``: the image tokens are positions of the prompt (False: the map's tokens are
    the keys of cross-attention layers, and spans over them hold key indices).
    """

    class_token: bool = False
    packed: bool = False
    in_sequence: bool = True

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

    def view_tile(self, token_map: ImageTokenMap) -> int:
        """The tile an example view draws (0 by default; a layout whose tile 0 shows only part
        of the image may pick the one that shows it whole)."""
        return 0

    def view_pixels(self, batch: Any, example: int) -> Float[Tensor, "3 height width"]:
        """The pixels the view tile (``view_tile``) of example ``example``'s image shows the
        tower, still normalised (what an example view draws)."""
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
        if layout.in_sequence:  # else the map's tokens are cross-attention keys
            check_token_count(token_map, len(batch.positions("image", i)), f"example {i}")
        maps.append([token_map])
    return maps
