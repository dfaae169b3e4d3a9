"""Anyres tiling rules (LLaVA-NeXT, LLaVA-OneVision): tile grid, best canvas, kept (unpadded)
region, and OneVision's anyres-max downscaling of the kept feature grid.

Sizes in this module are ``(height, width)``, as in Hugging Face's ``image_sizes``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn


@dataclass(frozen=True)
class AnyresGeometry:
    """The tiling rules of one LLaVA-NeXT or LLaVA-OneVision checkpoint.

    ``tile_size``: side of the square input of the vision tower (CLIP's ``image_size``, 336).
    ``patch_size``: side of a vision patch (14). ``grid_pinpoints``: the canvases
    ``(height, width)`` an image may be tiled into, each a multiple of ``tile_size``.
    ``max_tiles``: OneVision's ``anyres_max_<n>``; when the kept feature grid holds more than
    about ``n`` tiles' worth of features it is downscaled (bilinear) to about that many.
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

    @property
    def grid(self) -> int:
        """Patches along each side of a tile."""
        return self.tile_size // self.patch_size

    def canvas(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """The pinpoint ``(height, width)`` that keeps the most of the image and wastes least."""
        height, width = image_hw
        best, best_kept, best_wasted = self.grid_pinpoints[0], -1, float("inf")
        for canvas_h, canvas_w in self.grid_pinpoints:
            scale = min(canvas_w / width, canvas_h / height)
            kept = min(int(width * scale) * int(height * scale), width * height)
            wasted = canvas_w * canvas_h - kept
            if kept > best_kept or (kept == best_kept and wasted < best_wasted):
                best, best_kept, best_wasted = (canvas_h, canvas_w), kept, wasted
        return best

    def tile_grid(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Rows and columns of high-resolution tiles."""
        canvas_h, canvas_w = self.canvas(image_hw)
        return canvas_h // self.tile_size, canvas_w // self.tile_size

    def n_tiles(self, image_hw: tuple[int, int]) -> int:
        """Tiles the vision tower sees for this image, the base tile included."""
        rows, cols = self.tile_grid(image_hw)
        return rows * cols + 1

    def kept_region(self, image_hw: tuple[int, int]) -> tuple[int, int, int, int]:
        """``(row_start, row_stop, col_start, col_stop)`` of the feature grid kept by unpadding."""
        height, width = image_hw
        rows, cols = self.tile_grid(image_hw)
        grid_h, grid_w = rows * self.grid, cols * self.grid
        if width / height > grid_w / grid_h:
            pad = (grid_h - int(round(height * (grid_w / width), 7))) // 2
            region = (pad, grid_h - pad, 0, grid_w)
        else:
            pad = (grid_w - int(round(width * (grid_h / height), 7))) // 2
            region = (0, grid_h, pad, grid_w - pad)
        if region[0] == region[1] or region[2] == region[3]:
            raise ValueError(
                f"an image of {height}x{width} (height x width) is too elongated for the grid "
                f"pinpoints {[list(p) for p in self.grid_pinpoints]}: unpadding leaves no "
                "high-resolution feature of it; crop or pad the image to a less extreme aspect "
                "ratio, or add a pinpoint of that shape")
        return region

    def downscaled(self, rows: int, cols: int) -> tuple[int, int]:
        """The size a kept ``rows x cols`` feature grid is downscaled to (itself when it holds at
        most ``1.1**2 * max_tiles`` tiles' worth), with Hugging Face's own float arithmetic."""
        if self.max_tiles is None:
            return rows, cols
        ratio = math.sqrt(rows * cols / (self.max_tiles * self.grid**2))
        if ratio <= 1.1:
            return rows, cols
        return int(rows // ratio), int(cols // ratio)

    def feature_grid(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Rows and columns of high-resolution features packed for this image (newlines not
        counted): the kept region, downscaled under anyres-max."""
        row0, row1, col0, col1 = self.kept_region(image_hw)
        rows, cols = self.downscaled(row1 - row0, col1 - col0)
        if rows == 0 or cols == 0:
            raise ValueError(
                f"an image of {image_hw[0]}x{image_hw[1]} (height x width) is too elongated: "
                f"anyres_max_{self.max_tiles} downscaling leaves no high-resolution feature of "
                "it; crop or pad the image to a less extreme aspect ratio")
        return rows, cols

    def n_image_tokens(self, image_hw: tuple[int, int]) -> int:
        """Image tokens of one image: base features, kept tile features and one newline a row."""
        rows, cols = self.feature_grid(image_hw)
        return self.grid**2 + rows * (cols + 1)


def image_sizes_list(image_sizes: Any, n_images: int | None = None) -> list[tuple[int, int]]:
    """``image_sizes [images, 2]`` (height, width) as a checked list of int pairs."""
    if image_sizes is None:
        raise ValueError("LLaVA-NeXT needs image_sizes [images, 2], each image's original "
                         "(height, width): pass the processor's image_sizes, or build the inputs "
                         "with model.prepare(images, questions)")
    sizes = torch.as_tensor(image_sizes)
    if sizes.ndim != 2 or sizes.shape[1] != 2 or sizes.shape[0] == 0:
        raise ValueError(f"image_sizes has shape {list(sizes.shape)}; it must be [images, 2], "
                         "each image's original (height, width)")
    if n_images is not None and sizes.shape[0] != n_images:
        raise ValueError(f"image_sizes has {sizes.shape[0]} rows but pixel_values holds "
                         f"{n_images} images: give one (height, width) row per image")
    pairs = [(int(h), int(w)) for h, w in sizes.tolist()]
    if any(h <= 0 or w <= 0 for h, w in pairs):
        raise ValueError(f"image_sizes {pairs} must be positive (height, width) pairs")
    return pairs


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
