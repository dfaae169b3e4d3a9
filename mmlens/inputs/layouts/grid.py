"""The square-crop layout (LLaVA-1.5): one tower row per image, a ``grid x grid`` patch grid.

The image is padded to a square, resized or resized and centre-cropped to ``crop_size``
(``mmlens.inputs.geometry.preprocess_transform``) and cut into ``patch_size`` px patches;
image token k is patch k in row-major order. With a class token (CLIP) patch ``(r, c)`` is at
tower index ``1 + r * grid + c``; where the features keep it (``vision_feature_select_strategy
"full"``) the first image token is the class token's, made from no pixel.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

from jaxtyping import Float
from torch import Tensor

from mmlens.core.sizes import ImageSize, SizeOrPair, as_image_size
from mmlens.inputs.token_map import ImageLayout, ImageTokenMap, TileFrame, TokenPlace

Mode = Literal["resize_crop", "resize", "pad"]
MODES: tuple[str, ...] = ("resize_crop", "resize", "pad")


def preprocess_transform(
    image_size: SizeOrPair, crop_size: int = 336, mode: Mode = "resize_crop"
) -> tuple[tuple[Fraction, Fraction], tuple[Fraction, Fraction]]:
    """``(scale, shift)``, each x first, taking original-image pixels to pixels of the
    ``crop_size`` square."""
    size = as_image_size(image_size)
    width, height = size.width, size.height
    if mode == "resize_crop":
        short, long = min(width, height), max(width, height)
        new_long = int(crop_size * long / short)  # Hugging Face's rounding of the long edge
        new_w, new_h = (crop_size, new_long) if width <= height else (new_long, crop_size)
        scale = (Fraction(new_w, width), Fraction(new_h, height))
        shift = (Fraction(-((new_w - crop_size) // 2)), Fraction(-((new_h - crop_size) // 2)))
        return scale, shift
    if mode == "resize":
        return (Fraction(crop_size, width), Fraction(crop_size, height)), (Fraction(0), Fraction(0))
    if mode == "pad":
        side = max(width, height)
        scale = Fraction(crop_size, side)
        pad_x, pad_y = (side - width) // 2, (side - height) // 2
        return (scale, scale), (pad_x * scale, pad_y * scale)
    raise ValueError(f"unknown preprocessing mode {mode!r}: use one of {MODES}")


@dataclass(frozen=True)
class GridLayout(ImageLayout):
    """``crop_size`` px crops of ``patch_size`` px patches; ``class_token``: the tower's rows
    start with one; ``class_feature``: the image tokens start with its feature."""

    crop_size: int
    patch_size: int
    class_token: bool = True
    class_feature: bool = False

    @property
    def grid(self) -> int:
        return self.crop_size // self.patch_size

    @property
    def tower_length(self) -> int:
        return self.class_offset + self.grid**2

    @property
    def cell_px(self) -> int:
        return self.patch_size

    def token_map(self, image_size: Any, mode: str | None = None) -> ImageTokenMap:
        size = as_image_size(image_size)
        mode = mode or "resize_crop"
        scale, shift = preprocess_transform(size, self.crop_size, mode)
        grid = self.grid
        frame = TileFrame(scale, shift, self.patch_size, grid, grid, offset=self.class_offset)
        tokens = [TokenPlace("class", 0, -1, -1, ((0, 0),))] if self.class_feature else []
        tokens += [TokenPlace("cell", 0, r, c, ((0, frame.index(r, c)),))
                   for r in range(grid) for c in range(grid)]
        return ImageTokenMap(size, mode, tuple(tokens), (frame,),
                             tower_length=self.tower_length, class_offset=self.class_offset)

    def input_maps(self, batch: Any) -> list[list[ImageTokenMap]]:
        square = self.token_map(ImageSize(self.crop_size, self.crop_size), "resize")
        return [[square] for _ in range(len(batch))]

    def view_pixels(self, batch: Any, example: int) -> Float[Tensor, "3 height width"]:
        return batch.pixel_values.reshape(-1, *batch.pixel_values.shape[-3:])[example]
