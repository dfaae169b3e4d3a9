"""Anyres tiling rules (LLaVA-NeXT, LLaVA-OneVision): tile grid, best canvas, kept (unpadded)
region, and OneVision's anyres-max downscaling of the kept feature grid.

Image sizes are ``ImageSize(width, height)`` (``mmlens.core.sizes``). Hugging Face's
``image_sizes`` tensors hold ``(height, width)`` rows: they are read and written here only, by
``read_image_sizes`` and ``image_sizes_tensor``. Feature grids are ``Grid(rows, cols)`` and
regions of them ``Region(row_start, row_stop, col_start, col_stop)``, rows first as in the
tensors they index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from mmlens.core.errors import MMLensError
from mmlens.core.sizes import ImageSize, SizeOrPair, as_image_size


class Grid(NamedTuple):
    """A grid of tiles or features: ``rows`` (along the height), ``cols`` (along the width)."""

    rows: int
    cols: int


class Region(NamedTuple):
    """A half-open block ``[row_start, row_stop) x [col_start, col_stop)`` of a feature grid."""

    row_start: int
    row_stop: int
    col_start: int
    col_stop: int


def checked_size(size: ImageSize) -> ImageSize:
    """``size`` for ``AnyresGeometry``'s methods, which take only an ``ImageSize``: a bare pair
    is refused, because the tiling code sits beside Hugging Face's ``(height, width)`` rows and
    a pair's order could be either."""
    if not isinstance(size, ImageSize):
        raise MMLensError(
            f"AnyresGeometry takes an ImageSize, not {size!r}: pass ImageSize.of(image), "
            "ImageSize(width=..., height=...) or ImageSize.from_hw(height, width)")
    return as_image_size(size)


@dataclass(frozen=True)
class AnyresGeometry:
    """The tiling rules of one LLaVA-NeXT or LLaVA-OneVision checkpoint.

    ``tile_size``: side of the square input of the vision tower (CLIP's ``image_size``, 336).
    ``patch_size``: side of a vision patch (14). ``grid_pinpoints``: the model config's
    ``image_grid_pinpoints`` as it is, ``(height, width)`` pairs, each a multiple of
    ``tile_size``; ``canvases`` holds them as ``ImageSize``. ``max_tiles``: OneVision's
    ``anyres_max_<n>``; when the kept feature grid holds more than about ``n`` tiles' worth of
    features it is downscaled (bilinear) to about that many.

    The methods take an image's original size as an ``ImageSize`` (a bare pair is refused:
    ``checked_size``).
    """

    tile_size: int
    patch_size: int
    grid_pinpoints: tuple[tuple[int, int], ...]
    max_tiles: int | None = None

    def __post_init__(self) -> None:
        if not self.grid_pinpoints:
            raise ValueError("image_grid_pinpoints is empty: LLaVA-NeXT needs at least one "
                             "canvas (height, width), e.g. [[336, 672], [672, 336], [672, 672]]")
        for pinpoint in self.grid_pinpoints:
            if (len(pinpoint) != 2 or min(pinpoint) <= 0
                    or any(side % self.tile_size for side in pinpoint)):
                raise ValueError(
                    f"grid pinpoint {list(pinpoint)} is not a (height, width) pair of positive "
                    f"multiples of the {self.tile_size}-pixel tile: fix image_grid_pinpoints in "
                    "the model config")

    @classmethod
    def from_config(cls, cfg: Any) -> AnyresGeometry:
        """From a ``MultimodalConfig`` of a LLaVA-NeXT or LLaVA-OneVision model."""
        if not cfg.image_grid_pinpoints:
            raise ValueError("this config has no image_grid_pinpoints: is it a LLaVA-NeXT "
                             "(llava_next) or LLaVA-OneVision (llava_onevision) checkpoint?")
        return cls(cfg.vision.image_size, cfg.vision.patch_size,
                   tuple(tuple(int(v) for v in p) for p in cfg.image_grid_pinpoints),
                   getattr(cfg, "anyres_max_tiles", None))

    @cached_property
    def canvases(self) -> tuple[ImageSize, ...]:
        """The grid pinpoints as sizes, in the config's order."""
        return tuple(ImageSize.from_hw(*pinpoint) for pinpoint in self.grid_pinpoints)

    @property
    def grid(self) -> int:
        """Patches along each side of a tile."""
        return self.tile_size // self.patch_size

    def canvas(self, size: SizeOrPair) -> ImageSize:
        """The pinpoint canvas that keeps the most of the image and wastes least."""
        size = checked_size(size)
        best, best_kept, best_wasted = self.canvases[0], -1, float("inf")
        for canvas in self.canvases:
            scale = min(canvas.width / size.width, canvas.height / size.height)
            kept = min(int(size.width * scale) * int(size.height * scale),
                       size.width * size.height)
            wasted = canvas.width * canvas.height - kept
            if kept > best_kept or (kept == best_kept and wasted < best_wasted):
                best, best_kept, best_wasted = canvas, kept, wasted
        return best

    def tile_grid(self, size: SizeOrPair) -> Grid:
        """Rows and columns of high-resolution tiles."""
        canvas = self.canvas(checked_size(size))
        return Grid(rows=canvas.height // self.tile_size, cols=canvas.width // self.tile_size)

    def n_tiles(self, size: SizeOrPair) -> int:
        """Tiles the vision tower sees for this image, the base tile included."""
        tiles = self.tile_grid(checked_size(size))
        return tiles.rows * tiles.cols + 1

    def kept_region(self, size: SizeOrPair) -> Region:
        """The block of the tiles' feature grid that unpadding keeps."""
        size = checked_size(size)
        tiles = self.tile_grid(size)
        grid_h, grid_w = tiles.rows * self.grid, tiles.cols * self.grid
        if size.width / size.height > grid_w / grid_h:
            pad = (grid_h - int(round(size.height * (grid_w / size.width), 7))) // 2
            region = Region(pad, grid_h - pad, 0, grid_w)
        else:
            pad = (grid_w - int(round(size.width * (grid_h / size.height), 7))) // 2
            region = Region(0, grid_h, pad, grid_w - pad)
        if region.row_start == region.row_stop or region.col_start == region.col_stop:
            raise ValueError(
                f"an image of {size} is too elongated for the grid pinpoints "
                f"{[list(p) for p in self.grid_pinpoints]} (height, width): unpadding leaves no "
                "high-resolution feature of it; crop or pad the image to a less extreme aspect "
                "ratio, or add a pinpoint of that shape")
        return region

    def downscaled(self, rows: int, cols: int) -> Grid:
        """The size a kept ``rows x cols`` feature grid is downscaled to (itself when it holds at
        most ``1.1**2 * max_tiles`` tiles' worth), with Hugging Face's own float arithmetic."""
        if self.max_tiles is None:
            return Grid(rows, cols)
        ratio = math.sqrt(rows * cols / (self.max_tiles * self.grid**2))
        if ratio <= 1.1:
            return Grid(rows, cols)
        return Grid(int(rows // ratio), int(cols // ratio))

    def feature_grid(self, size: SizeOrPair) -> Grid:
        """Rows and columns of high-resolution features packed for this image (newlines not
        counted): the kept region, downscaled under anyres-max."""
        size = checked_size(size)
        kept = self.kept_region(size)
        grid = self.downscaled(kept.row_stop - kept.row_start, kept.col_stop - kept.col_start)
        if grid.rows == 0 or grid.cols == 0:
            raise ValueError(
                f"an image of {size} is too elongated: anyres_max_{self.max_tiles} downscaling "
                "leaves no high-resolution feature of it; crop or pad the image to a less "
                "extreme aspect ratio")
        return grid

    def n_image_tokens(self, size: SizeOrPair) -> int:
        """Image tokens of one image: base features, kept tile features and one newline a row."""
        grid = self.feature_grid(checked_size(size))
        return self.grid**2 + grid.rows * (grid.cols + 1)


def read_image_sizes(image_sizes: Any, n_images: int | None = None) -> list[ImageSize]:
    """Hugging Face's ``image_sizes [images, 2]`` (rows ``(height, width)``) as checked sizes."""
    if image_sizes is None:
        raise ValueError("LLaVA-NeXT needs image_sizes [images, 2], each image's original "
                         "(height, width): pass the processor's image_sizes, or build the inputs "
                         "with model.prepare(images, questions)")
    rows = torch.as_tensor(image_sizes)
    if rows.ndim != 2 or rows.shape[1] != 2 or rows.shape[0] == 0:
        raise ValueError(f"image_sizes has shape {list(rows.shape)}; it must be [images, 2], "
                         "each image's original (height, width)")
    if n_images is not None and rows.shape[0] != n_images:
        raise ValueError(f"image_sizes has {rows.shape[0]} rows but pixel_values holds "
                         f"{n_images} images: give one (height, width) row per image")
    hw_rows = [(int(h), int(w)) for h, w in rows.tolist()]
    if any(h <= 0 or w <= 0 for h, w in hw_rows):
        raise ValueError(f"image_sizes {hw_rows} must be positive (height, width) pairs")
    return [ImageSize.from_hw(h, w) for h, w in hw_rows]


def image_sizes_tensor(sizes: list[ImageSize]) -> Int[Tensor, "images 2"]:
    """Sizes as Hugging Face's ``image_sizes`` tensor, rows ``(height, width)``."""
    return torch.tensor([as_image_size(size).hw for size in sizes], dtype=torch.long)


def pad_tiles(pixel_values: list[Tensor]) -> Float[Tensor, "images tiles channels height width"]:
    """Stack per-prompt ``[1, tiles, 3, H, W]`` pixel values, zero-padding the tile axis."""
    n_tiles = max(p.shape[1] for p in pixel_values)
    return torch.cat([nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, n_tiles - p.shape[1]))
                      for p in pixel_values])


def bilinear_sources(n_in: int, n_out: int) -> Bool[Tensor, "n_out n_in"]:
    """Which inputs a bilinear (``align_corners=False``) resize from ``n_in`` to ``n_out``
    samples draws on with a non-zero weight, per output; read off PyTorch's own interpolation
    of the identity, so it agrees with the packer's ``F.interpolate`` to the last bit."""
    if n_in == n_out:
        return torch.eye(n_in, dtype=torch.bool)
    weights = nn.functional.interpolate(torch.eye(n_in)[None], size=n_out, mode="linear")[0]
    return (weights != 0).T
