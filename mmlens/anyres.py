"""LLaVA-NeXT's anyres images: tile selection and packing of tile features into image tokens.

An image of original size ``(H, W)`` becomes a square *base* tile (the whole image resized to
``tile_size``) plus a grid of *high-resolution tiles* cut from the image resized into the best
``grid_pinpoints`` canvas. After the vision tower and projector, the packer lays the tiles'
features out as one big feature grid, crops away rows or columns that only hold padding
("unpadding", back to the original aspect ratio) and appends the learned ``image_newline``
after every row::

    image tokens = [base: grid x grid features] + [kept row 0 ..., newline] + [kept row 1 ...]

Sizes in this module are ``(height, width)``, as in Hugging Face's ``image_sizes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint


@dataclass(frozen=True)
class AnyresGeometry:
    """The tiling rules of one LLaVA-NeXT checkpoint.

    ``tile_size``: side of the square input of the vision tower (CLIP's ``image_size``, 336).
    ``patch_size``: side of a vision patch (14). ``grid_pinpoints``: the canvases
    ``(height, width)`` an image may be tiled into, each a multiple of ``tile_size``.
    """

    tile_size: int
    patch_size: int
    grid_pinpoints: tuple[tuple[int, int], ...]

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
        """From a ``MultimodalConfig`` of a LLaVA-NeXT model."""
        if not cfg.image_grid_pinpoints:
            raise ValueError("this config has no image_grid_pinpoints: is it a LLaVA-NeXT "
                             "(llava_next) checkpoint?")
        return cls(cfg.vision.image_size, cfg.vision.patch_size,
                   tuple(tuple(int(v) for v in p) for p in cfg.image_grid_pinpoints))

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

    def n_image_tokens(self, image_hw: tuple[int, int]) -> int:
        """Image tokens of one image: base features, kept tile features and one newline a row."""
        row0, row1, col0, col1 = self.kept_region(image_hw)
        return self.grid**2 + (row1 - row0) * (col1 - col0 + 1)


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


class AnyresPacker(nn.Module):
    """Tile features ``[n_tiles_total, grid * grid, d_model]`` -> image tokens
    ``[n_image_tokens, d_model]``, exactly as Hugging Face's ``pack_image_features``.

    Parameter: ``image_newline [d_model]``. Hooks: ``hook_tiles`` (projected features of every
    tile, each image's base tile first, ``[n_tiles_total, grid * grid, d_model]``) and
    ``hook_out`` (the packed image tokens of all images in input order).
    """

    def __init__(self, cfg: Any):
        super().__init__()
        if cfg.feature_select_strategy != "default":
            raise ValueError(
                f"vision_feature_select_strategy {cfg.feature_select_strategy!r} keeps CLIP's CLS "
                "feature, which has no place on LLaVA-NeXT's tile grid (Hugging Face's "
                "LlavaNextForConditionalGeneration cannot run it either): use 'default'")
        self.geometry = AnyresGeometry.from_config(cfg)
        self.image_newline = nn.Parameter(torch.zeros(cfg.text.d_model))
        self.hook_tiles = HookPoint()  # [n_tiles_total, grid * grid, d_model]
        self.hook_out = HookPoint()  # [n_image_tokens, d_model]

    def select_tiles(
        self, pixel_values: Tensor, image_sizes: Any
    ) -> Float[Tensor, "n_tiles_total channels height width"]:
        """Drop the zero tiles that pad ``[images, tiles, 3, H, W]`` to a common tile count."""
        if pixel_values.ndim == 4:
            sizes = image_sizes_list(image_sizes)
            self._check_tile_count(pixel_values.shape[0], sizes, "pixel_values")
            return pixel_values
        if pixel_values.ndim != 5:
            raise ValueError(f"pixel_values has shape {list(pixel_values.shape)}; LLaVA-NeXT takes "
                             "[images, tiles, 3, H, W] with image_sizes, as its processor gives")
        sizes = image_sizes_list(image_sizes, pixel_values.shape[0])
        counts = [self.geometry.n_tiles(hw) for hw in sizes]
        for i, (hw, count) in enumerate(zip(sizes, counts, strict=True)):
            if count > pixel_values.shape[1]:
                raise ValueError(
                    f"image {i} of size {hw[0]}x{hw[1]} needs {count} tiles (base included) but "
                    f"pixel_values holds {pixel_values.shape[1]} per image: are image_sizes the "
                    "original (height, width) the processor returned for these pixel_values?")
        return torch.cat([tiles[:count] for tiles, count in zip(pixel_values, counts, strict=True)])

    def _check_tile_count(self, n_rows: int, sizes: list[tuple[int, int]], what: str) -> None:
        expected = sum(self.geometry.n_tiles(hw) for hw in sizes)
        if n_rows != expected:
            raise ValueError(
                f"{what} holds {n_rows} tiles but image_sizes {sizes} give {expected} (base "
                "tiles included): image_sizes must be the original (height, width) of the very "
                "images these tiles were cut from")

    def forward(
        self, features: Float[Tensor, "n_tiles_total n_patches d_model"], image_sizes: Any
    ) -> Float[Tensor, "n_image_tokens d_model"]:
        """Pack tile features; ``features`` may also be ``[images * tiles, ...]`` with padded
        tiles in the processor's layout, which are dropped here."""
        sizes = image_sizes_list(image_sizes)
        counts = [self.geometry.n_tiles(hw) for hw in sizes]
        per_image = features.shape[0] // len(sizes)
        if (features.shape[0] != sum(counts) and features.shape[0] % len(sizes) == 0
                and per_image >= max(counts)):
            keep = [i * per_image + t for i, count in enumerate(counts) for t in range(count)]
            features = features[torch.tensor(keep, device=features.device)]
        self._check_tile_count(features.shape[0], sizes, "features")
        grid = self.geometry.grid
        if features.shape[1] != grid * grid:
            raise ValueError(f"each tile has {features.shape[1]} features but a tile is a "
                             f"{grid}x{grid} grid of patches: LLaVA-NeXT packs patch features "
                             "only (vision_feature_select_strategy 'default')")
        features = self.hook_tiles(features)
        packed = [self._pack_image(tiles, hw)
                  for tiles, hw in zip(features.split(counts), sizes, strict=True)]
        return self.hook_out(torch.cat(packed))

    def _pack_image(
        self, tiles: Float[Tensor, "tiles n_patches d_model"], image_hw: tuple[int, int]
    ) -> Float[Tensor, "n_tokens d_model"]:
        rows, _ = self.geometry.tile_grid(image_hw)
        base, high = tiles[0], tiles[1:]
        canvas = rearrange(high, "(tr tc) (pr pc) d -> (tr pr) (tc pc) d",
                           tr=rows, pr=self.geometry.grid)
        row0, row1, col0, col1 = self.geometry.kept_region(image_hw)
        canvas = canvas[row0:row1, col0:col1]
        newline = self.image_newline.to(canvas.dtype).expand(canvas.shape[0], 1, -1)
        return torch.cat([base, torch.cat([canvas, newline], dim=1).flatten(0, 1)])
