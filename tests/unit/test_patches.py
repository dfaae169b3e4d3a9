"""Boxes -> patches, checked against grids worked out by hand and against HF's CLIP processor."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image
from typecheck import unchecked

from mmlens.inputs.geometry import (
    boxes_to_patch_mask,
    canvas_patch_mask,
    corner_box,
    other_image_positions,
    preprocess_transform,
    related_image_positions,
    scale_and_shift,
)

GRID = 24


def cells(mask: torch.Tensor) -> set[tuple[int, int]]:
    """The (row, col) of every marked patch of a 24 x 24 mask."""
    assert mask.shape == (GRID * GRID,) and mask.dtype == torch.bool
    return {(int(i) // GRID, int(i) % GRID) for i in mask.nonzero().flatten()}


def block(rows: range, cols: range) -> set[tuple[int, int]]:
    return {(r, c) for r in rows for c in cols}


@pytest.mark.parametrize("mode", ["resize_crop", "pad"])
def test_square_image_at_crop_size_is_the_identity(mode):
    size = (336, 336)
    assert cells(boxes_to_patch_mask([(0, 0, 14, 14)], size, mode=mode)) == {(0, 0)}
    assert cells(boxes_to_patch_mask([(14, 14, 14, 14)], size, mode=mode)) == {(1, 1)}
    assert cells(boxes_to_patch_mask([(0, 0, 15, 14)], size, mode=mode)) == {(0, 0), (0, 1)}
    assert cells(boxes_to_patch_mask([(0, 0, 336, 336)], size, mode=mode)) == block(
        range(24), range(24)
    )


def test_box_ending_on_a_patch_border_stops_there():
    # 672 px -> 336 px: the box [28, 56) maps to [14, 28), exactly patch 1
    assert cells(boxes_to_patch_mask([(28, 28, 28, 28)], (672, 672))) == {(1, 1)}
    assert cells(boxes_to_patch_mask([(28, 28, 29, 28)], (672, 672))) == {(1, 1), (1, 2)}
    # 500 x 375 -> 448 x 336, crop offset 56 px: x = 78.125 maps exactly to 14
    assert cells(boxes_to_patch_mask([(62.5, 0, 15.625, 10)], (500, 375))) == {(0, 0)}
    assert cells(boxes_to_patch_mask([(62.5, 0, 15.75, 10)], (500, 375))) == {(0, 0), (0, 1)}


def test_tiny_boxes_mark_the_patch_they_sit_in():
    assert cells(boxes_to_patch_mask([(10, 20, 1, 1)], (336, 336))) == {(1, 0)}
    # one original pixel of a 1000 px image is a third of a crop pixel: still one patch
    assert cells(boxes_to_patch_mask([(999, 999, 1, 1)], (1000, 1000))) == {(23, 23)}
    assert cells(boxes_to_patch_mask([(5, 5, 0, 3)], (336, 336))) == set()


def test_landscape_resize_crop_cuts_the_sides():
    size = (672, 336)  # stays 672 x 336, crop keeps x in [168, 504)
    assert cells(boxes_to_patch_mask([(168, 0, 14, 14)], size)) == {(0, 0)}
    assert cells(boxes_to_patch_mask([(0, 0, 168, 336)], size)) == set()
    assert cells(boxes_to_patch_mask([(160, 0, 20, 14)], size)) == {(0, 0)}
    assert cells(boxes_to_patch_mask([(490, 0, 50, 14)], size)) == {(0, 23)}


def test_landscape_pad_centres_the_image_vertically():
    size = (672, 336)  # padded to 672 x 672 (168 px above), then halved
    assert cells(boxes_to_patch_mask([(0, 0, 28, 28)], size, mode="pad")) == {(6, 0)}
    assert cells(boxes_to_patch_mask([(0, 0, 672, 336)], size, mode="pad")) == block(
        range(6, 18), range(24)
    )


def test_portrait_both_modes():
    size = (336, 672)
    assert cells(boxes_to_patch_mask([(0, 168, 14, 14)], size)) == {(0, 0)}
    assert cells(boxes_to_patch_mask([(0, 0, 14, 160)], size)) == set()
    assert cells(boxes_to_patch_mask([(0, 0, 28, 28)], size, mode="pad")) == {(0, 6)}


def test_resize_crop_uses_hf_rounding_of_the_long_edge():
    # 336 * 500 / 333 = 504.5 -> 504, crop offset (504 - 336) // 2 = 84
    scale, shift = preprocess_transform((333, 500), 336, "resize_crop")
    assert scale == (Fraction(336, 333), Fraction(504, 500))
    assert shift == (0, -84)


def test_several_boxes_are_united():
    mask = boxes_to_patch_mask([(0, 0, 14, 14), (322, 322, 14, 14)], (336, 336))
    assert cells(mask) == {(0, 0), (23, 23)}
    assert not boxes_to_patch_mask([], (336, 336)).any()


def test_positions_related_and_other():
    related = related_image_positions([(14, 0, 14, 14)], (336, 336), image_positions=5)
    assert related.tolist() == [6]
    shuffled = torch.arange(100, 676)
    related = related_image_positions([(0, 14, 28, 14)], (336, 336), shuffled)
    assert related.tolist() == [124, 125]
    other = other_image_positions(shuffled, related)
    assert other.numel() == 574 and not torch.isin(other, related).any()


def test_canvas_mask_for_anyres_tiles():
    # a 672 x 672 canvas cut into four 336 tiles; the box straddles the tile border at x = 336
    box = scale_and_shift(corner_box((330, 0, 25, 14)), scale=(1, 1))
    left = canvas_patch_mask([box], (336, 336))
    right = canvas_patch_mask([scale_and_shift(box, (1, 1), shift=(-336, 0))], (336, 336))
    assert cells(left) == {(0, 23)} and cells(right) == {(0, 0), (0, 1)}


def test_errors_say_what_to_fix():
    with pytest.raises(ValueError, match="unknown preprocessing mode"), unchecked():
        boxes_to_patch_mask([], (10, 10), mode="squash")
    with pytest.raises(ValueError, match="negative width"):
        boxes_to_patch_mask([(0, 0, -1, 4)], (10, 10))
    with pytest.raises(ValueError, match="whole number"):
        canvas_patch_mask([], (300, 336))
    with pytest.raises(ValueError, match="576 patches"):
        related_image_positions([], (336, 336), image_positions=[1, 2, 3])


def _hf_white_patches(image: Image.Image) -> set[tuple[int, int]]:
    """Patches holding a white pixel after HF's CLIP preprocessing (nearest resampling)."""
    pil_clip = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    from transformers.image_utils import PILImageResampling

    processor = pil_clip.CLIPImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        do_normalize=False,
        do_rescale=False,
        resample=PILImageResampling.NEAREST,
    )
    pixels = np.asarray(processor(images=image, return_tensors="np")["pixel_values"])[0, 0]
    rows, cols = np.nonzero(pixels > 127)
    return {(int(r) // 14, int(c) // 14) for r, c in zip(rows, cols, strict=True)}


@pytest.mark.parametrize("mode", ["resize_crop", "pad"])
@pytest.mark.parametrize(
    "size, box",
    [((500, 375), (100, 50, 120, 90)), ((333, 500), (40, 300, 57, 33)), ((640, 427), (0, 0, 9, 9))],
)
def test_agrees_with_hf_clip_processor(size, box, mode):
    image = Image.new("RGB", size)
    x, y, w, h = box
    image.paste((255, 255, 255), (x, y, x + w, y + h))
    if mode == "pad":
        side = max(size)
        square = Image.new("RGB", (side, side))
        square.paste(image, ((side - size[0]) // 2, (side - size[1]) // 2))
        image = square
    ours = cells(boxes_to_patch_mask([box], size, mode=mode))
    white = _hf_white_patches(image)
    # nearest resampling may drop a sliver under one resized pixel at the box edge, never add one
    assert white <= ours
    assert len(ours - white) <= 2 * (len({r for r, _ in ours}) + len({c for _, c in ours}))
