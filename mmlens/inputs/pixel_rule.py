"""The paper's pixel rule for ``related`` image patches: a red-box mask through the processor.

The paper's code draws a mask image the size of the photo: a green ``(0, 255, 0)`` background
with each object box filled red by PIL,
``rectangle((int(x), int(y), int(x) + int(w), int(y) + int(h)))`` (PIL includes both corners),
pushes it through the image's own preprocessing (pad to square or anyres tiling, resize with
the processor's resampling, crop) with rescaling and normalisation off, and calls an image
position related when its patch holds at least one pixel that is exactly ``(255, 0, 0)``.
The red patches become tokens through the image's token map (``mmlens.inputs.token_map``).
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

from mmlens.core.sizes import SizeOrPair, as_image_size
from mmlens.data.example import Box
from mmlens.inputs.preprocessing import pad_to_square
from mmlens.inputs.protocol import InputsModel
from mmlens.inputs.token_map import ImageLayout, ImageTokenMap, PatchRef

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


def red_patch_refs(processor: Any, token_map: ImageTokenMap, boxes: Sequence[Box],
                   patch_size: int) -> set[PatchRef]:
    """The tower patches (``(tile, index)``) holding a red pixel of the processed mask."""
    tiles = processed_mask(processor, box_mask_image(token_map.image_size, boxes),
                           token_map.mode or "")
    offset = token_map.class_offset
    return {(tile, offset + int(k)) for tile in range(min(len(tiles), token_map.n_tiles))
            for k in red_patches(tiles[tile], patch_size).flatten().nonzero().flatten()}


def pixel_rule_mask(processor: Any, layout: ImageLayout, boxes: Sequence[Box],
                    image_size: SizeOrPair, mode: str
                    ) -> tuple[Bool[Tensor, " n"], Bool[Tensor, " n"]]:
    """``(related, newline)`` over one image's tokens, in the order of its token map
    (``layout.token_map(image_size, mode)``): a token is related when a patch it is made from
    holds a red pixel. For LLaVA-1.5 ``n`` is the grid's patches (a class-token feature first
    where the features keep it); for anyres, the base tile's patches, then the kept
    high-resolution rows each ended by its newline position, as the model orders them.
    """
    token_map = layout.token_map(as_image_size(image_size), mode)
    red = red_patch_refs(processor, token_map, boxes, layout.cell_px)
    newline = torch.tensor([k == "newline" for k in token_map.kinds], dtype=torch.bool)
    return token_map.tokens_of(red), newline


def add_pixel_rule_spans(model: InputsModel, batch: Any, images: Sequence[Image.Image],
                         boxes: Sequence[Sequence[Box]], maps: Sequence[ImageTokenMap], *,
                         mode: str) -> None:
    """Add ``related`` and ``other`` spans by the pixel rule (``other``: the tokens made from
    patches that are not related; no newline, no class token). ``maps``: each example's."""
    patch = model.family.image_layout(model).cell_px
    related, other = [], []
    for i, (token_map, example_boxes) in enumerate(zip(maps, boxes, strict=True)):
        positions = batch.positions("image", i)
        touched = token_map.tokens_of(red_patch_refs(model.processor, token_map,
                                                     example_boxes, patch))
        related.append(positions[touched])
        other.append(positions[token_map.sees_pixels() & ~touched])
    batch.add_span("related", related)
    batch.add_span("other", other)
