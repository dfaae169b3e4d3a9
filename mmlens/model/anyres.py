"""Anyres images (LLaVA-NeXT, LLaVA-OneVision): tile selection and packing of tile features
into image tokens.

An image (original size ``ImageSize(width, height)``) becomes a square *base* tile (the whole
image resized to ``tile_size``) plus a grid of *high-resolution tiles* cut from the image resized
into the best ``grid_pinpoints`` canvas. After the vision tower and projector, the packer lays
the tiles' features out as one big feature grid, crops away rows or columns that only hold
padding ("unpadding", back to the original aspect ratio), for LLaVA-OneVision's
``anyres_max_<n>`` downscales that grid (bilinear) when it holds more than about ``n`` tiles'
worth of features, and appends the learned ``image_newline`` after every row::

    image tokens = [base: grid x grid features] + [kept row 0 ..., newline] + [kept row 1 ...]

The ``image_sizes`` tensors passed in are Hugging Face's (rows ``(height, width)``); they are
read into ``ImageSize``s by ``read_image_sizes`` as they arrive.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn import functional as F
from transformer_lens.hook_points import HookPoint

from mmlens.core.sizes import ImageSize
from mmlens.inputs.tiling import AnyresGeometry, read_image_sizes


class AnyresPacker(nn.Module):
    """Tile features ``[n_tiles_total, grid * grid, d_model]`` -> image tokens
    ``[n_image_tokens, d_model]``, exactly as Hugging Face's ``pack_image_features``.

    Parameter: ``image_newline [d_model]``. Hooks: ``hook_tiles`` (projected features of every
    tile, each image's base tile first, ``[n_tiles_total, grid * grid, d_model]``) and
    ``hook_out`` (the packed image tokens of all images in input order).
    """

    def __init__(self, cfg: Any):
        super().__init__()
        has_cls = cfg.vision.has_class_token
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
            sizes = read_image_sizes(image_sizes)
            self._check_tile_count(pixel_values.shape[0], sizes, "pixel_values")
            return pixel_values
        if pixel_values.ndim != 5:
            raise ValueError(f"pixel_values has shape {list(pixel_values.shape)}; LLaVA-NeXT takes "
                             "[images, tiles, 3, H, W] with image_sizes, as its processor gives")
        sizes = read_image_sizes(image_sizes, pixel_values.shape[0])
        counts = [self.geometry.n_tiles(size) for size in sizes]
        for i, (size, count) in enumerate(zip(sizes, counts, strict=True)):
            if count > pixel_values.shape[1]:
                raise ValueError(
                    f"image {i} of size {size} needs {count} tiles (base included) but "
                    f"pixel_values holds {pixel_values.shape[1]} per image: are image_sizes the "
                    "original (height, width) the processor returned for these pixel_values?")
        return torch.cat([tiles[:count] for tiles, count in zip(pixel_values, counts, strict=True)])

    def _check_tile_count(self, n_rows: int, sizes: list[ImageSize], what: str) -> None:
        expected = sum(self.geometry.n_tiles(size) for size in sizes)
        if n_rows != expected:
            raise ValueError(
                f"{what} holds {n_rows} tiles but image_sizes {[list(s.hw) for s in sizes]} "
                f"(height, width) give {expected} (base "
                "tiles included): image_sizes must be the original (height, width) of the very "
                "images these tiles were cut from")

    def forward(
        self, features: Float[Tensor, "n_tiles_total n_patches d_model"], image_sizes: Any
    ) -> Float[Tensor, "n_image_tokens d_model"]:
        """Pack tile features; ``features`` may also be ``[images * tiles, ...]`` with padded
        tiles in the processor's layout, which are dropped here."""
        sizes = read_image_sizes(image_sizes)
        counts = [self.geometry.n_tiles(size) for size in sizes]
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
        packed = [self._pack_image(tiles, size)
                  for tiles, size in zip(features.split(counts), sizes, strict=True)]
        return self.hook_out(torch.cat(packed))

    def _pack_image(
        self, tiles: Float[Tensor, "tiles n_patches d_model"], size: ImageSize
    ) -> Float[Tensor, "n_tokens d_model"]:
        tile_rows = self.geometry.tile_grid(size).rows
        base, high = tiles[0], tiles[1:]
        canvas = rearrange(high, "(tr tc) (pr pc) d -> (tr pr) (tc pc) d",
                           tr=tile_rows, pr=self.geometry.grid)
        kept = self.geometry.kept_region(size)
        canvas = canvas[kept.row_start:kept.row_stop, kept.col_start:kept.col_stop]
        target = self.geometry.feature_grid(size)
        if (target.rows, target.cols) != tuple(canvas.shape[:2]):
            # as Hugging Face: [d, rows, cols] contiguous, bilinear, align_corners=False
            grid = rearrange(canvas, "r c d -> 1 d r c").contiguous()
            canvas = rearrange(F.interpolate(grid, [target.rows, target.cols], mode="bilinear"),
                               "1 d r c -> r c d")
        newline = self.image_newline.to(canvas.dtype).expand(canvas.shape[0], 1, -1)
        return torch.cat([base, torch.cat([canvas, newline], dim=1).flatten(0, 1)])
