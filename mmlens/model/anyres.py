"""Anyres images (LLaVA-NeXT, LLaVA-OneVision): tile selection and packing of tile features
into image tokens.

An image of original size ``(H, W)`` becomes a square *base* tile (the whole image resized to
``tile_size``) plus a grid of *high-resolution tiles* cut from the image resized into the best
``grid_pinpoints`` canvas. After the vision tower and projector, the packer lays the tiles'
features out as one big feature grid, crops away rows or columns that only hold padding
("unpadding", back to the original aspect ratio), for LLaVA-OneVision's ``anyres_max_<n>``
downscales that grid (bilinear) when it holds more than about ``n`` tiles' worth of features,
and appends the learned ``image_newline`` after every row::

    image tokens = [base: grid x grid features] + [kept row 0 ..., newline] + [kept row 1 ...]

Sizes in this module are ``(height, width)``, as in Hugging Face's ``image_sizes``.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn import functional as F
from transformer_lens.hook_points import HookPoint

from mmlens.inputs.tiling import AnyresGeometry, image_sizes_list


class AnyresPacker(nn.Module):
    """Tile features ``[n_tiles_total, grid * grid, d_model]`` -> image tokens
    ``[n_image_tokens, d_model]``, exactly as Hugging Face's ``pack_image_features``.

    Parameter: ``image_newline [d_model]``. Hooks: ``hook_tiles`` (projected features of every
    tile, each image's base tile first, ``[n_tiles_total, grid * grid, d_model]``) and
    ``hook_out`` (the packed image tokens of all images in input order).
    """

    def __init__(self, cfg: Any):
        super().__init__()
        has_cls = getattr(cfg.vision, "has_class_token", True)
        if has_cls and cfg.feature_select_strategy != "default":
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
                             f"{grid}x{grid} grid of patches: anyres packs patch features only "
                             "(vision_feature_select_strategy 'default' for CLIP, 'full' for "
                             "SigLIP)")
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
        size = self.geometry.feature_grid(image_hw)
        if size != tuple(canvas.shape[:2]):
            # as Hugging Face: [d, rows, cols] contiguous, bilinear, align_corners=False
            grid = rearrange(canvas, "r c d -> 1 d r c").contiguous()
            canvas = rearrange(F.interpolate(grid, list(size), mode="bilinear"), "1 d r c -> r c d")
        newline = self.image_newline.to(canvas.dtype).expand(canvas.shape[0], 1, -1)
        return torch.cat([base, torch.cat([canvas, newline], dim=1).flatten(0, 1)])
