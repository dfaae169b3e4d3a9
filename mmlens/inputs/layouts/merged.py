"""The merged-cell layout (Qwen2-VL, Qwen2.5-VL): dynamic resolution, ``m x m`` patches a token.

The processor resizes a ``W x H`` image, aspect kept, to the nearest multiple of
``patch_size * merge_size`` on each side with the pixel count in ``[min_pixels, max_pixels]``
(``smart_resize``); nothing is cropped or padded. The resized image is cut into ``patch_size``
px patches, packed in merge-block order (``m x m`` blocks row-major, then row-major inside a
block), so image token k, the k-th cell in row-major order, is made from packed patches
``m*m*k .. m*m*k + m*m - 1``. Every image of a call is one packed tower row without a class
token; a map's patch indices count from its image's first patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mmlens.core.sizes import ImageSize, as_image_size
from mmlens.inputs.token_map import ImageLayout, ImageTokenMap, TileFrame, TokenPlace


def packed_patch_order(grid_h: int, grid_w: int, merge_size: int) -> Int[Tensor, " n_patches"]:
    """Row-major patch index of each patch in the processor's (merge-block) order."""
    index = torch.arange(grid_h * grid_w).reshape(grid_h, grid_w)
    blocks = index.reshape(grid_h // merge_size, merge_size, grid_w // merge_size, merge_size)
    return blocks.transpose(1, 2).flatten()


def unpack_patches(
    pixel_values: Float[Tensor, "n_patches patch_dim"], grid_h: int, grid_w: int,
    patch_size: int, merge_size: int, temporal_patch_size: int, n_channels: int = 3,
) -> Float[Tensor, "n_channels height width"]:
    """The resized image ``[C, grid_h * patch_size, grid_w * patch_size]`` back from one
    image's packed patches (still rescaled and normalised as the processor left them).

    The processor packs each patch as ``(C, temporal, patch, patch)`` (the still image repeated
    over ``temporal``) and the patches in merge-block order: ``(grid_h / merge, grid_w / merge)``
    blocks row-major, then ``merge x merge`` patches row-major inside a block. Only the first
    ``grid_h * grid_w`` rows are read (``prepare`` pads examples to the longest).
    """
    if grid_h % merge_size or grid_w % merge_size:
        raise ValueError(f"a {grid_h}x{grid_w} patch grid does not split into {merge_size}x"
                         f"{merge_size} merge blocks: is image_grid_thw this image's?")
    n_patches = grid_h * grid_w
    dim = n_channels * temporal_patch_size * patch_size**2
    if pixel_values.shape[0] < n_patches or pixel_values.shape[-1] != dim:
        raise ValueError(f"pixel_values {tuple(pixel_values.shape)} cannot hold a {grid_h}x"
                         f"{grid_w} grid of {dim}-value patches: pass one image's packed rows")
    blocks = pixel_values[:n_patches].reshape(
        grid_h // merge_size, grid_w // merge_size, merge_size, merge_size,
        n_channels, temporal_patch_size, patch_size, patch_size)[:, :, :, :, :, 0]
    # (block_row, block_col, row_in_block, col_in_block, C, py, px) -> (C, y, x)
    return blocks.permute(4, 0, 2, 5, 1, 3, 6).reshape(
        n_channels, grid_h * patch_size, grid_w * patch_size)


@dataclass(frozen=True)
class MergedLayout(ImageLayout):
    """``patch_size`` px patches merged ``merge_size x merge_size`` per token; ``min_pixels`` /
    ``max_pixels`` bound the resized image (the image processor's)."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_pixels: int
    packed: bool = True

    @classmethod
    def from_image_processor(cls, image_processor: Any) -> MergedLayout:
        size = image_processor.size
        return cls(image_processor.patch_size, image_processor.merge_size,
                   getattr(image_processor, "temporal_patch_size", 2),
                   size["shortest_edge"] if "shortest_edge" in size else size["min_pixels"],
                   size["longest_edge"] if "longest_edge" in size else size["max_pixels"])

    @property
    def tower_length(self) -> None:
        return None

    @property
    def cell_px(self) -> int:
        return self.patch_size * self.merge_size

    def resized(self, image_size: Any) -> ImageSize:
        """The size the processor resizes an image of ``image_size`` to (its ``smart_resize``)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        size = as_image_size(image_size)
        height, width = smart_resize(size.height, size.width, factor=self.cell_px,
                                     min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return ImageSize(width, height)

    def token_map(self, image_size: Any, mode: str | None = None) -> ImageTokenMap:
        size = as_image_size(image_size)
        return self._map(size, self.resized(size), mode)

    def _map(self, size: ImageSize, resized: ImageSize, mode: str | None) -> ImageTokenMap:
        patch, merge = self.patch_size, self.merge_size
        grid_h, grid_w = resized.height // patch, resized.width // patch
        scale = (Fraction(resized.width, size.width), Fraction(resized.height, size.height))
        frame = TileFrame(scale, (Fraction(0), Fraction(0)), patch, grid_h, grid_w,
                          merge=merge)
        per_token, cols = merge * merge, grid_w // merge
        tokens = tuple(
            TokenPlace("merged", 0, k // cols, k % cols,
                       tuple((0, k * per_token + j) for j in range(per_token)))
            for k in range(grid_h * grid_w // per_token))
        return ImageTokenMap(size, mode, tokens, (frame,), tower_length=grid_h * grid_w,
                             class_offset=0, packed=True)

    def _grids(self, batch: Any) -> list[list[int]]:
        return torch.as_tensor(batch.image_sizes).reshape(-1, 3).tolist()

    def input_maps(self, batch: Any) -> list[list[ImageTokenMap]]:
        """One map per ``image_grid_thw`` row, given to the examples in order by their image
        tokens (one still image each)."""
        from mmlens.inputs.vision_spans import images_of_examples

        if batch.image_sizes is None:
            raise ValueError("the batch's image tokens cannot be mapped into the packed vision "
                             "tower: it has no image_grid_thw (image_sizes); build it with "
                             "model.prepare")
        maps = []
        for _, grid_h, grid_w in self._grids(batch):
            if grid_h % self.merge_size or grid_w % self.merge_size:
                raise ValueError(f"image_grid_thw {self._grids(batch)} holds an image whose "
                                 f"patches do not merge {self.merge_size}x{self.merge_size}: "
                                 "was the batch built for this model?")
            seen = ImageSize(grid_w * self.patch_size, grid_h * self.patch_size)
            maps.append(self._map(seen, seen, None))
        return images_of_examples(batch, maps)

    def view_pixels(self, batch: Any, example: int) -> Float[Tensor, "3 height width"]:
        t, grid_h, grid_w = self._grids(batch)[example]
        if t != 1:
            raise ValueError(f"image_grid_thw {[t, grid_h, grid_w]} is not one still image: a "
                             "view needs one, prepared with this model's processor")
        pixels = batch.pixel_values[example] if batch.pixel_values.ndim == 3 else (
            batch.pixel_values)
        return unpack_patches(pixels.reshape(-1, pixels.shape[-1]), grid_h, grid_w,
                              self.patch_size, self.merge_size, self.temporal_patch_size)
