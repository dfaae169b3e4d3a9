"""The pooled square layout (Gemma 3): one tower row per image, patches averaged in blocks.

The image is resized (or, where the processor says so, cropped or padded) to ``crop_size``
(``layouts.grid.preprocess_transform``) and cut into ``patch_size`` px patches, ``grid x grid``
of them, no class token (SigLIP). The projector averages each ``kernel x kernel`` block of
patches into one image token, row-major: token ``(r, c)`` is made from patches
``(r * kernel + i, c * kernel + j)`` for ``i, j < kernel``, so its vision-tower span is those
``kernel ** 2`` patches and its box their union.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jaxtyping import Float
from torch import Tensor

from mmlens.core.sizes import ImageSize, as_image_size
from mmlens.inputs.layouts.grid import preprocess_transform
from mmlens.inputs.token_map import ImageLayout, ImageTokenMap, TileFrame, TokenPlace


@dataclass(frozen=True)
class PooledGridLayout(ImageLayout):
    """``crop_size`` px squares of ``patch_size`` px patches, each ``kernel x kernel`` block of
    patches pooled into one image token (``kernel`` 1: one token a patch, PaliGemma)."""

    crop_size: int
    patch_size: int
    kernel: int = 1

    def __post_init__(self) -> None:
        if self.kernel < 1 or (self.crop_size // self.patch_size) % self.kernel:
            raise ValueError(f"a {self.grid}x{self.grid} patch grid does not split into "
                             f"{self.kernel}x{self.kernel} blocks: check mm_tokens_per_image "
                             "against the vision config's image and patch sizes")

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.crop_size // self.patch_size

    @property
    def side(self) -> int:
        """Image tokens per side."""
        return self.grid // self.kernel

    @property
    def tower_length(self) -> int:
        return self.grid**2

    @property
    def cell_px(self) -> int:
        return self.patch_size * self.kernel

    def token_map(self, image_size: Any, mode: str | None = None) -> ImageTokenMap:
        size = as_image_size(image_size)
        mode = mode or "resize"
        scale, shift = preprocess_transform(size, self.crop_size, mode)
        frame = TileFrame(scale, shift, self.patch_size, self.grid, self.grid)
        k = self.kernel
        tokens = tuple(
            TokenPlace("cell", 0, r, c, tuple((0, frame.index(r * k + i, c * k + j))
                                              for i in range(k) for j in range(k)))
            for r in range(self.side) for c in range(self.side))
        return ImageTokenMap(size, mode, tokens, (frame,), tower_length=self.tower_length,
                             class_offset=0)

    def input_maps(self, batch: Any) -> list[list[ImageTokenMap]]:
        square = self.token_map(ImageSize(self.crop_size, self.crop_size), "resize")
        return [[square] for _ in range(len(batch))]

    def view_pixels(self, batch: Any, example: int) -> Float[Tensor, "3 height width"]:
        return batch.pixel_values.reshape(-1, *batch.pixel_values.shape[-3:])[example]
