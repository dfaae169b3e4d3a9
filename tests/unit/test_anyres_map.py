"""LLaVA-NeXT geometry: tiling, unpadding, the position map and boxes -> related positions.

Checked against grids worked out by hand, against Hugging Face's own tiling and packing code,
and against the pixels its image processor produces for a red box drawn on a white image.
"""

from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_next import (
    PATCH,
    PINPOINTS,
    TILE,
    tiny_image_processor,
    tiny_next_config,
    tiny_processor,
)
from transformers import LlavaNextModel
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from mmlens.core.sizes import ImageSize
from mmlens.inputs.anyres_spans import (
    anyres_masks,
    anyres_related_positions,
    image_position_map,
    tile_transform,
)
from mmlens.inputs.tiling import AnyresGeometry
from mmlens.model.anyres import AnyresPacker

GEOMETRY = AnyresGeometry(TILE, PATCH, tuple(tuple(p) for p in PINPOINTS))
GRID = TILE // PATCH
PROCESSOR = tiny_processor()
# (height, width), Hugging Face's order: portrait, landscape, square, smaller than a tile, large,
# extreme, odd sizes
SIZES = [(90, 40), (40, 90), (64, 64), (20, 20), (150, 100), (30, 200), (33, 47), (101, 37),
         (64, 32), (32, 64), (40, 300), (500, 499)]


def local(kind_rows: list, positions: list) -> list[int]:
    return [i for i, p in enumerate(positions) if (p.kind, p.tile_row, p.tile_col, p.patch_row,
                                                   p.patch_col) in kind_rows]


@pytest.mark.parametrize("hw", SIZES)
def test_geometry_matches_hugging_face(hw):
    size = ImageSize.from_hw(*hw)
    n_features = PROCESSOR._get_number_of_features(*hw, TILE, TILE) - 1
    assert GEOMETRY.canvas(size).hw == select_best_resolution(hw, PINPOINTS)
    assert GEOMETRY.n_tiles(size) == image_size_to_num_patches(hw, PINPOINTS, TILE)
    assert GEOMETRY.n_image_tokens(size) == n_features
    assert len(image_position_map(size, GEOMETRY)) == n_features


@pytest.mark.parametrize("hw", SIZES)
def test_position_map_matches_packing(hw):
    """Features that carry their own (tile, patch) index, packed by ours and by HF."""
    size = ImageSize.from_hw(*hw)
    n_tiles = GEOMETRY.n_tiles(size)
    tile_index = torch.arange(n_tiles)[:, None].expand(n_tiles, GRID * GRID)
    patch_index = torch.arange(GRID * GRID)[None].expand(n_tiles, GRID * GRID)
    features = torch.stack([tile_index, patch_index], dim=-1).float()
    cfg = SimpleNamespace(feature_select_strategy="default", image_grid_pinpoints=PINPOINTS,
                          vision=SimpleNamespace(image_size=TILE, patch_size=PATCH,
                                                 has_class_token=True),
                          text=SimpleNamespace(d_model=2))
    packer = AnyresPacker(cfg)
    with torch.no_grad():
        packer.image_newline.fill_(-1)
    packed = packer(features, torch.tensor([hw]))
    hf_self = SimpleNamespace(config=tiny_next_config())
    (reference,), _ = LlavaNextModel.pack_image_features(
        hf_self, [features], torch.tensor([hw]), "default", image_newline=torch.full((2,), -1.0))
    assert torch.equal(packed, reference)
    cols = GEOMETRY.tile_grid(size).cols
    for row, position in zip(packed.long().tolist(), image_position_map(size, GEOMETRY),
                             strict=True):
        tile, patch = row
        if position.kind == "newline":
            assert (tile, patch, position.patch_col, position.box) == (-1, -1, -1, None)
            continue
        expected_tile = (-1, -1) if tile == 0 else divmod(tile - 1, cols)
        assert position.kind == ("base" if tile == 0 else "tile")
        assert (position.tile_row, position.tile_col) == expected_tile
        assert (position.patch_row, position.patch_col) == divmod(patch, GRID)


def test_pixel_boxes_on_a_grid_without_padding():
    # 64 x 32 (w x h) fills the 32x64 canvas: tiles see original pixels 1:1, base squashes x by 2
    positions = image_position_map((64, 32), GEOMETRY)
    assert len(positions) == 16 + 4 * 9
    assert positions[0].box == (0, 0, 16, 8) and positions[5].box == (16, 8, 32, 16)
    first_tile = positions[16:25]
    assert [p.box for p in first_tile[:2]] == [(0, 0, 8, 8), (8, 0, 16, 8)]
    assert (first_tile[4].tile_col, first_tile[4].patch_col, first_tile[4].box) == (
        1, 0, (32, 0, 40, 8))
    assert first_tile[8].kind == "newline" and first_tile[8].box is None
    assert positions[-2].box == (56, 24, 64, 32)


def test_pixel_boxes_with_padding():
    # 40 x 90 (w x h): 64x32 canvas (2 tiles stacked), resized to 29 x 64, pasted at x = 1
    scale, paste, canvas = tile_transform((40, 90), GEOMETRY)
    assert (scale, paste, canvas) == ((Fraction(29, 40), Fraction(64, 90)), (1, 0), (32, 64))
    positions = image_position_map((40, 90), GEOMETRY)
    assert GEOMETRY.kept_region(ImageSize(width=40, height=90)) == (0, 8, 0, 4)
    first = positions[16]
    assert first.box == pytest.approx((0, 0, 7 * 40 / 29, 8 * 90 / 64))
    last = positions[-2]
    assert (last.tile_row, last.patch_row, last.patch_col) == (1, 3, 3)
    assert last.box == pytest.approx((23 * 40 / 29, 56 * 90 / 64, 40, 90))


def test_unpadding_crops_padding_rows():
    # 200 x 30: canvas 32x64, image resized to 64 x 10 and pasted at y = 11; rows 1-2 are kept
    assert GEOMETRY.kept_region(ImageSize(width=200, height=30)) == (1, 3, 0, 8)
    positions = image_position_map((200, 30), GEOMETRY)
    tiles = [p for p in positions if p.kind == "tile"]
    assert {p.patch_row for p in tiles} == {1, 2} and len(tiles) == 16
    assert tiles[0].box == pytest.approx((0, 0, 25, (16 - 11) * 3))


def test_related_positions_by_hand():
    related, other = anyres_related_positions([(0, 0, 16, 8)], (64, 32), GEOMETRY)
    assert related.tolist() == [0, 16, 17]
    newline = [16 + 9 * r + 8 for r in range(4)]
    assert sorted(related.tolist() + other.tolist() + newline) == list(range(16 + 36))
    # one pixel past a patch border spills into the next patch, in the base and in the tiles
    related, _ = anyres_related_positions([(0, 0, 16.5, 8)], (64, 32), GEOMETRY)
    assert related.tolist() == [0, 1, 16, 17, 18]
    related, other = anyres_related_positions([(0, 0, 64, 32)], (64, 32), GEOMETRY)
    assert len(related) == 16 + 32 and len(other) == 0
    related, other = anyres_related_positions([], (64, 32), GEOMETRY)
    assert len(related) == 0 and len(other) == 48


def test_related_positions_accept_the_model_config():
    cfg = SimpleNamespace(image_grid_pinpoints=PINPOINTS,
                          vision=SimpleNamespace(image_size=TILE, patch_size=PATCH))
    by_config = anyres_related_positions([(3, 4, 10, 20)], (40, 90), cfg)
    by_geometry = anyres_related_positions([(3, 4, 10, 20)], (40, 90), GEOMETRY)
    assert all(torch.equal(a, b) for a, b in zip(by_config, by_geometry, strict=True))


def test_pad_mode_shifts_boxes_onto_the_square():
    padded = anyres_related_positions([(5, 10, 20, 30)], (40, 90), GEOMETRY, mode="pad")
    square = anyres_related_positions([(5 + 25, 10, 20, 30)], (90, 90), GEOMETRY)
    assert all(torch.equal(a, b) for a, b in zip(padded, square, strict=True))


@pytest.mark.parametrize("hw", SIZES)
def test_related_equals_pixel_box_overlap(hw):
    width, height = hw[::-1]
    positions = image_position_map((width, height), GEOMETRY)
    rng = np.random.default_rng(hw[0] * 1000 + hw[1])
    for _ in range(12):
        x, y = rng.uniform(0, width - 0.5) + 0.0314, rng.uniform(0, height - 0.5) + 0.0271
        box = (x, y, rng.uniform(0.1, width - x), rng.uniform(0.1, height - y))
        related, newline = anyres_masks([box], (width, height), GEOMETRY)
        expected = [p.box is not None and max(p.box[0], box[0]) < min(p.box[2], box[0] + box[2])
                    and max(p.box[1], box[1]) < min(p.box[3], box[1] + box[3])
                    for p in positions]
        assert related.tolist() == expected
        assert newline.tolist() == [p.kind == "newline" for p in positions]


@pytest.mark.parametrize("hw,box", [((90, 40), (9, 20, 13, 41)), ((40, 90), (50, 3, 33, 30)),
                                    ((20, 20), (2, 11, 7, 6)), ((30, 200), (120, 5, 60, 19)),
                                    ((150, 100), (10, 70, 45, 50))])
def test_boxes_match_the_processors_pixels(hw, box):
    """A red box on white, through HF's processor: the patches showing red are the related ones."""
    height, width = hw
    size = ImageSize(width=width, height=height)
    pixels = np.full((height, width, 3), 255, dtype=np.uint8)
    x, y, w, h = box
    pixels[y:y + h, x:x + w] = (255, 0, 0)
    processed = tiny_image_processor()(Image.fromarray(pixels), return_tensors="np")
    tiles = torch.from_numpy(processed["pixel_values"][0][:GEOMETRY.n_tiles(size)])
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    rgb = tiles * std + mean
    red = (rgb[:, 0] - rgb[:, 1]).unfold(1, PATCH, PATCH).unfold(2, PATCH, PATCH).amax((-1, -2))
    cols = GEOMETRY.tile_grid(size).cols
    shown = []
    for p in image_position_map((width, height), GEOMETRY):
        if p.kind == "newline":
            shown.append(0.0)
            continue
        tile = 0 if p.kind == "base" else 1 + p.tile_row * cols + p.tile_col
        shown.append(float(red[tile, p.patch_row, p.patch_col]))
    shown = torch.tensor(shown)
    related, _ = anyres_masks([box], (width, height), GEOMETRY)
    assert related.sum() > 0
    assert not (shown > 0.5)[~related].any(), "a patch shows the box but is not related"
    assert (shown[related] > 0.02).all(), "a related patch shows nothing of the box"


def test_bad_pinpoints_and_unusable_images():
    with pytest.raises(ValueError, match="not a .height, width. pair of positive multiples"):
        AnyresGeometry(TILE, PATCH, ((32, 48),))
    with pytest.raises(ValueError, match="image_grid_pinpoints is empty"):
        AnyresGeometry(TILE, PATCH, ())
    # Hugging Face tiles a 1 x 5000 image, then unpadding drops every high-resolution row
    assert GEOMETRY.canvas(ImageSize(width=5000, height=1)).hw == (32, 64)
    with pytest.raises(ValueError, match="too elongated for the grid pinpoints"):
        GEOMETRY.n_image_tokens(ImageSize(width=5000, height=1))
    with pytest.raises(ValueError, match="too elongated for the grid pinpoints"):
        anyres_related_positions([(0, 0, 1, 1)], (5000, 1), GEOMETRY)
