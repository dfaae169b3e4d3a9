"""The paper's pixel rule for ``related`` image patches: a red-box mask through the processor.

The paper's code draws a mask image the size of the photo: a green ``(0, 255, 0)`` background
with each object box filled red by PIL,
``rectangle((int(x), int(y), int(x) + int(w), int(y) + int(h)))`` (PIL includes both corners),
pushes it through the image's own preprocessing (pad to square or anyres tiling, resize with
the processor's resampling, crop) with rescaling and normalisation off, and calls an image
position related when its patch holds at least one pixel that is exactly ``(255, 0, 0)``.
Resampling blurs the box edges, so this differs from the exact box arithmetic of
``mmlens.inputs.geometry`` by a patch or two along some edges (``docs/reproducing.md``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float
from PIL import Image, ImageDraw
from torch import Tensor

from mmlens.core.sizes import ImageSize, SizeOrPair, as_image_size
from mmlens.data.example import Box
from mmlens.inputs.geometry import other_image_positions
from mmlens.inputs.preprocessing import pad_to_square
from mmlens.inputs.protocol import InputsModel
from mmlens.inputs.tiling import AnyresGeometry

RED = (255, 0, 0)
GREEN = (0, 255, 0)


def box_mask_image(image_size: SizeOrPair, boxes: Iterable[Box]) -> Image.Image:
    """The paper's mask: ``image_size = (width, height)``, green, each box drawn red."""
    size = as_image_size(image_size)
    mask = Image.new("RGB", (size.width, size.height), GREEN)
    draw = ImageDraw.Draw(mask)
    for x, y, w, h in boxes:
        draw.rectangle((int(x), int(y), int(x) + int(w), int(y) + int(h)), fill=RED)
    return mask


def processed_mask(processor: Any, mask: Image.Image, mode: str
                   ) -> Float[Tensor, "tiles 3 height width"]:
    """The mask as the vision tower would see it, in 0..255 (rescale and normalise off).

    ``mode="pad"`` pads it to a square first, exactly as ``prepare`` pads the photo.
    """
    if mode == "pad":
        mask = pad_to_square(mask, processor)
    out = processor.image_processor(mask, do_rescale=False, do_normalize=False,
                                    return_tensors="pt")
    pixels = torch.as_tensor(out["pixel_values"])
    return pixels.reshape(-1, *pixels.shape[-3:]).float()


def red_patches(pixels: Float[Tensor, "3 height width"], patch_size: int
                ) -> Bool[Tensor, "rows cols"]:
    """Patches holding at least one pixel exactly ``(255, 0, 0)``."""
    red = (pixels[0] == 255) & (pixels[1] == 0) & (pixels[2] == 0)
    rows, cols = red.shape[0] // patch_size, red.shape[1] // patch_size
    red = red[:rows * patch_size, :cols * patch_size]
    return red.reshape(rows, patch_size, cols, patch_size).any(dim=3).any(dim=1)


def pixel_rule_mask(processor: Any, cfg: Any, boxes: Sequence[Box], image_size: SizeOrPair,
                    mode: str) -> tuple[Bool[Tensor, " n"], Bool[Tensor, " n"]]:
    """``(related, newline)`` over one image's feature positions (CLS excluded).

    For LLaVA-1.5 ``n`` is the grid's patches; for anyres, the base tile's patches, then the
    kept high-resolution rows each ended by its newline position, as the model orders them.
    """
    patch = cfg.vision.patch_size
    tiles = processed_mask(processor, box_mask_image(image_size, boxes), mode)
    base = red_patches(tiles[0], patch).flatten()
    if not cfg.is_anyres:
        return base, torch.zeros_like(base)
    geometry = AnyresGeometry.from_config(cfg)
    size = as_image_size(image_size)
    if mode == "pad":
        side = max(size.width, size.height)
        size = ImageSize(width=side, height=side)
    tile_rows, tile_cols = geometry.tile_grid(size)
    grid = geometry.grid
    canvas = torch.zeros(tile_rows * grid, tile_cols * grid, dtype=torch.bool)
    for index in range(tile_rows * tile_cols):
        row, col = divmod(index, tile_cols)
        canvas[row * grid:(row + 1) * grid, col * grid:(col + 1) * grid] = red_patches(
            tiles[1 + index], patch)
    row0, row1, col0, col1 = geometry.kept_region(size)
    kept = canvas[row0:row1, col0:col1]
    no, yes = (torch.full((kept.shape[0], 1), v, dtype=torch.bool) for v in (False, True))
    related = torch.cat([base, torch.cat([kept, no], dim=1).flatten()])
    newline = torch.cat([torch.zeros_like(base),
                         torch.cat([torch.zeros_like(kept), yes], dim=1).flatten()])
    return related, newline


def add_pixel_rule_spans(model: InputsModel, batch: Any, images: Sequence[Image.Image],
                         boxes: Sequence[Sequence[Box]], *, mode: str) -> None:
    """Add ``related`` and ``other`` spans by the pixel rule (``other`` leaves out newlines)."""
    related, other = [], []
    for i, (image, example_boxes) in enumerate(zip(images, boxes, strict=True)):
        positions = batch.positions("image", i)
        if model.cfg.feature_select_strategy == "full" and not model.cfg.is_anyres:
            positions = positions[1:]  # the CLS feature covers no patch
        mask, newline = pixel_rule_mask(model.processor, model.cfg, example_boxes, image.size,
                                        mode)
        if mask.numel() != positions.numel():
            raise ValueError(f"example {i}: the pixel rule gives {mask.numel()} patches but the "
                             f"prompt holds {positions.numel()} image positions: does the "
                             "processor match the model's vision config?")
        related.append(positions[mask])
        other.append(other_image_positions(positions[~newline], positions[mask]))
    batch.add_span("related", related)
    batch.add_span("other", other)
