"""One image-size convention: ``ImageSize(width, height)`` from the PIL image to the patches.

A landscape image 300 px wide and 200 px tall goes through the public functions, and every
grid, region and patch is compared with values worked out by hand below: a wrong order (the
image read as 200 wide and 300 tall) gives other tiles, other kept columns and other patches.
"""

from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from tiny_next import tiny_image_processor
from transformers.image_processing_utils import select_best_resolution
from typecheck import unchecked

from mmlens.core.errors import MMLensError
from mmlens.core.sizes import ImageSize, as_image_size
from mmlens.inputs.anyres_spans import anyres_related_positions, image_position_map
from mmlens.inputs.geometry import boxes_to_patch_mask, canvas_patch_mask
from mmlens.inputs.tiling import (
    AnyresGeometry,
    Grid,
    Region,
    image_sizes_tensor,
    read_image_sizes,
)
from mmlens.model.anyres import AnyresPacker

IMAGE = Image.new("RGB", (300, 200))  # PIL takes (width, height)
SIZE = ImageSize(width=300, height=200)
# 100-px tiles of 10-px patches; Hugging Face's pinpoints are (height, width): one landscape
# canvas (100 tall, 200 wide) and one portrait canvas (200 tall, 100 wide)
PINPOINTS = ((100, 200), (200, 100))
GEOMETRY = AnyresGeometry(100, 10, PINPOINTS)
TOP_RIGHT = (270, 0, 30, 20)  # (x, y, w, h): the top-right 30 x 20 px of the image


def test_image_size_reads_pil_and_hugging_face_orders():
    assert ImageSize.of(IMAGE) == SIZE
    assert (SIZE.width, SIZE.height, SIZE.hw) == (300, 200, (200, 300))
    assert ImageSize.from_hw(200, 300) == SIZE
    processed = tiny_image_processor()(IMAGE, return_tensors="pt")
    assert processed["image_sizes"].tolist() == [[200, 300]]  # HF's rows are (height, width)
    assert read_image_sizes(processed["image_sizes"]) == [SIZE]
    assert torch.equal(image_sizes_tensor([SIZE]), processed["image_sizes"])


def test_landscape_image_gets_the_landscape_tiling():
    # canvas 200 x 100 (w x h): scale min(200/300, 100/200) = 1/2 keeps 150 x 100 px;
    # canvas 100 x 200: scale 1/3 keeps 100 x 66 px. The landscape canvas wins: 1 row, 2 tiles.
    assert GEOMETRY.canvases == (ImageSize(width=200, height=100), ImageSize(width=100, height=200))
    assert GEOMETRY.canvas(SIZE) == ImageSize(width=200, height=100)
    assert select_best_resolution(SIZE.hw, [list(p) for p in PINPOINTS]) == (100, 200)
    assert GEOMETRY.tile_grid(SIZE) == Grid(rows=1, cols=2)
    assert GEOMETRY.n_tiles(SIZE) == 3
    # the 10 x 20 feature grid holds the image resized to 150 x 100 px, pasted at x = 25: its
    # features span x = 2.5 .. 17.5 patches; unpadding keeps int(300 * 10 / 200) = 15 columns,
    # cut (20 - 15) // 2 = 2 from the left
    assert GEOMETRY.kept_region(SIZE) == Region(row_start=0, row_stop=10, col_start=2, col_stop=18)
    assert GEOMETRY.feature_grid(SIZE) == Grid(rows=10, cols=16)
    assert GEOMETRY.n_image_tokens(SIZE) == 10 * 10 + 10 * (16 + 1)


def test_packer_reads_image_sizes_in_hugging_faces_order():
    cfg = SimpleNamespace(feature_select_strategy="default", image_grid_pinpoints=PINPOINTS,
                          vision=SimpleNamespace(image_size=100, patch_size=10,
                                                 has_class_token=True),
                          text=SimpleNamespace(d_model=1))
    packed = AnyresPacker(cfg)(torch.zeros(3, 100, 1), image_sizes_tensor([SIZE]))
    assert packed.shape == (10 * 10 + 10 * 17, 1)


def test_top_right_box_maps_to_top_right_patches():
    # base tile: the image squashed to 100 x 100 (x / 3, y / 2): the box covers x 90..100,
    # y 0..10, the base patch at row 0, column 9 (position 9).
    # tiles: x * 1/2 + 25, y * 1/2 on the 200 x 100 canvas: x 160..175, y 0..10, canvas
    # columns 16 and 17 of row 0, i.e. kept columns 14 and 15 (the last two of 16), after the
    # 100 base features: positions 100 + 14 and 100 + 15.
    related, other = anyres_related_positions([TOP_RIGHT], SIZE, GEOMETRY)
    assert related.tolist() == [9, 114, 115]
    assert len(related) + len(other) == 100 + 10 * 16
    positions = image_position_map(SIZE, GEOMETRY)
    tiles = [positions[i] for i in related.tolist()[1:]]
    assert [(p.tile_row, p.tile_col, p.patch_row, p.patch_col) for p in tiles] == [
        (0, 1, 0, 6), (0, 1, 0, 7)]
    assert positions[9].box == (270, 0, 300, 20)  # the base patch covers the box exactly
    # the bottom-left 30 x 20 px: base patch (9, 0); on the canvas x 25..40, y 90..100, canvas
    # columns 2 and 3 of row 9, the first two kept columns of the last row (17 positions a row
    # with its newline)
    related, _ = anyres_related_positions([(0, 180, 30, 20)], SIZE, GEOMETRY)
    assert related.tolist() == [90, 100 + 9 * 17, 100 + 9 * 17 + 1]


@pytest.mark.parametrize("mode, box, patches", [
    # straight to 100 x 100 (x / 3, y / 2): x 90..100, y 0..10 -> row 0, column 9
    ("resize", TOP_RIGHT, [9]),
    # height to 100 (x and y / 2), width int(100 * 300 / 200) = 150, centre crop from x = 25:
    # x 200..230 -> 75..90 -> columns 7 and 8 of row 0
    ("resize_crop", (200, 0, 30, 20), [7, 8]),
    # on a 300 x 300 square from y = 50, then / 3: x 90..100, y 16.7..23.3 -> rows 1-2, col 9
    ("pad", TOP_RIGHT, [19, 29]),
])
def test_box_to_patch_mask_follows_width_then_height(mode, box, patches):
    mask = boxes_to_patch_mask([box], SIZE, crop_size=100, patch_size=10, mode=mode)
    assert mask.nonzero().flatten().tolist() == patches
    pil_size = boxes_to_patch_mask([box], IMAGE.size, crop_size=100, patch_size=10, mode=mode)
    assert torch.equal(pil_size, mask)  # a bare pair is read as (width, height), PIL's order


def test_bare_pairs_are_converted_by_the_documented_rule_or_refused():
    assert as_image_size((300, 200)) == SIZE
    assert as_image_size(torch.tensor([300, 200])) == SIZE
    with pytest.raises(MMLensError, match=r"image size \(300,\) is not a \(width, height\) pair"):
        as_image_size((300,))
    with pytest.raises(MMLensError, match=r"\(300.5, 200\) .* must be whole numbers of pixels"):
        as_image_size((300.5, 200))
    with pytest.raises(MMLensError, match=r"canvas size \(0, 100\) .* must be positive"):
        canvas_patch_mask([], (0, 100), patch_size=10)
    with pytest.raises(MMLensError, match="ImageSize.of takes a PIL image, not a tuple"):
        ImageSize.of((300, 200))
    # beside Hugging Face's (height, width) rows a bare pair is ambiguous: the tiling refuses it
    with pytest.raises(MMLensError, match=r"AnyresGeometry takes an ImageSize, not \(200, 300\)"),\
            unchecked():
        GEOMETRY.tile_grid((200, 300))
    assert GEOMETRY.tile_grid(SIZE) == Grid(rows=1, cols=2)
