"""Anyres-max span geometry against Hugging Face's own packing: features that carry their
source index (or a box indicator) are packed by ``pack_image_features``, and the position map
and related mask must say exactly which kept features each packed feature draws on."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from tiny_onevision import tiny_onevision_config
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

from mmlens.core.sizes import ImageSize
from mmlens.inputs.anyres_spans import anyres_masks, image_position_map
from mmlens.inputs.tiling import AnyresGeometry
from mmlens.model.families.onevision import onevision_config

HF_CONFIG = tiny_onevision_config()
GEOMETRY = AnyresGeometry.from_config(onevision_config(HF_CONFIG))
UNCAPPED = replace(GEOMETRY, max_tiles=None)
GRID = GEOMETRY.grid
# (height, width), Hugging Face's order: kept as is, downscaled square, unpadded + downscaled,
# tall, tiny, extreme
SIZES = [(32, 64), (64, 64), (40, 90), (90, 60), (20, 70), (10, 10), (33, 200)]


def hf_pack(features: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    hf_self = SimpleNamespace(config=HF_CONFIG)
    (packed,), _ = LlavaOnevisionModel.pack_image_features(
        hf_self, [features], torch.tensor([hw]), image_newline=torch.zeros(features.shape[-1]),
        vision_aspect_ratio=HF_CONFIG.vision_aspect_ratio)
    return packed


def source_index(position, hw: tuple[int, int]) -> int:
    """Row of a (tile, patch) in the features fed to the packer (base tile first)."""
    cols = GEOMETRY.tile_grid(ImageSize.from_hw(*hw)).cols
    tile = 0 if position.kind == "base" else 1 + position.tile_row * cols + position.tile_col
    return tile * GRID * GRID + position.patch_row * GRID + position.patch_col


@pytest.mark.parametrize("hw", SIZES)
def test_position_boxes_are_the_union_of_bilinear_sources(hw):
    size = ImageSize.from_hw(*hw)
    n_tiles = GEOMETRY.n_tiles(size)
    n_sources = n_tiles * GRID * GRID
    features = torch.eye(n_sources).view(n_tiles, GRID * GRID, n_sources)
    packed = hf_pack(features, hw)
    positions = image_position_map(size, GEOMETRY)
    assert len(positions) == packed.shape[0] == GEOMETRY.n_image_tokens(size)
    source_boxes = {source_index(p, hw): p.box for p in image_position_map(size, UNCAPPED)
                    if p.kind != "newline"}
    for row, position in zip(packed, positions, strict=True):
        sources = row.nonzero().flatten().tolist()
        if position.kind == "newline":
            assert sources == [] and position.box is None
            continue
        assert source_index(position, hw) == sources[0]  # the top-left source names the position
        boxes = [source_boxes[s] for s in sources]
        filled = [b for b in boxes if b[2] > b[0] and b[3] > b[1]] or boxes[:1]
        union = (min(b[0] for b in filled), min(b[1] for b in filled),
                 max(b[2] for b in filled), max(b[3] for b in filled))
        assert position.box == union


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("box", [(0, 0, 9, 7), (13.5, 2, 4, 20), (30, 5, 1, 1)])
def test_related_mask_matches_packed_box_indicator(hw, box):
    """Pack the uncapped per-feature "touches the box" indicator with HF: a packed feature is
    related exactly when the bilinear resize gives it a non-zero share of a related feature."""
    height, width = hw
    box = (min(box[0], width - 1), min(box[1], height - 1), box[2], box[3])
    n_tiles = GEOMETRY.n_tiles(ImageSize(width=width, height=height))
    uncapped_related, _ = anyres_masks([box], (width, height), UNCAPPED)
    features = torch.zeros(n_tiles * GRID * GRID, 1)
    for position, related in zip(image_position_map((width, height), UNCAPPED),
                                 uncapped_related.tolist(), strict=True):
        if position.kind != "newline":
            features[source_index(position, hw)] = float(related)
    packed = hf_pack(features.view(n_tiles, GRID * GRID, 1), hw)
    related, newline = anyres_masks([box], (width, height), GEOMETRY)
    assert torch.equal(related, packed[:, 0] > 0)
    kinds = [p.kind for p in image_position_map((width, height), GEOMETRY)]
    assert newline.tolist() == [k == "newline" for k in kinds]


def test_tiles_that_are_not_a_whole_number_of_patches():
    """SigLIP's 384-px tiles hold 27 patches of 14 px (378 px): each tile starts its own patch
    grid and its last pixels are seen by no patch. Scaled down: 36-px tiles of 8-px patches."""
    geometry = AnyresGeometry(36, 8, ((36, 72), (72, 36), (72, 72)))
    size = (72, 36)  # (width, height): fills the 36x72 canvas 1:1, base tile squashes x by 2
    positions = image_position_map(size, geometry)
    tile_positions = [p for p in positions if p.kind == "tile"]
    second_tile = [p for p in tile_positions if p.tile_col == 1]
    assert (second_tile[0].patch_col, second_tile[0].box) == (0, (36, 0, 44, 8))
    assert tile_positions[3].box == (24, 0, 32, 8)  # last patch of tile 0 ends at 32, not 36

    def related(box):
        mask, _ = anyres_masks([box], size, geometry)
        return [(p.kind, p.tile_col, p.patch_row, p.patch_col)
                for p, m in zip(positions, mask.tolist(), strict=True) if m]

    # canvas x 40..44 lies in tile 1's first patch (36..44); base x 20..22 in base patch col 2
    assert related((40, 0, 4, 4)) == [("base", -1, 0, 2), ("tile", 1, 0, 0)]
    # canvas x 33..35 lies in the strip of tile 0 no patch sees; base x 16.5..17.5 in col 2
    assert related((33, 10, 2, 2)) == [("base", -1, 1, 2)]


@pytest.mark.parametrize("size, box", [
    ((500, 375), (100, 50, 120, 90)),     # 1 x 2 tiles, unpadded columns
    ((2000, 1500), (700, 400, 300, 500)),  # 4 x 6 tiles, 108 x 144 kept, downscaled to 70 x 93
    ((1200, 300), (10, 10, 40, 280)),      # 1 x 4 tiles
])
def test_related_patches_agree_with_the_pixels_at_real_geometry(size, box):
    """End to end at OneVision's real geometry (384-px tiles of 14-px patches, anyres_max_9):
    a white box on a black image goes through HF's image processor (nearest resampling), the
    patches holding white pixels are packed by HF's ``pack_image_features``, and the packed
    features that see white must be the related ones (nearest resampling may drop a sliver at
    the box edge, never add one)."""
    import numpy as np
    from PIL import Image
    from transformers import LlavaOnevisionConfig
    from transformers.image_utils import PILImageResampling
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    config = LlavaOnevisionConfig()
    geometry = AnyresGeometry.from_config(onevision_config(config))
    assert (geometry.tile_size, geometry.patch_size, geometry.grid) == (384, 14, 27)
    image = Image.new("RGB", size)
    x, y, w, h = box
    image.paste((255, 255, 255), (x, y, x + w, y + h))
    processor = LlavaOnevisionImageProcessorPil(
        image_grid_pinpoints=config.image_grid_pinpoints, resample=PILImageResampling.NEAREST,
        do_rescale=False, do_normalize=False)
    tiles = np.asarray(processor([image], return_tensors="np")["pixel_values"])[0]
    n_tiles = geometry.n_tiles(ImageSize.of(image))
    seen = tiles[:n_tiles, 0, :27 * 14, :27 * 14] > 127  # the pixels the 27 x 27 patches see
    white = torch.from_numpy(seen.reshape(n_tiles, 27, 14, 27, 14).any(axis=(2, 4)))
    (packed,), _ = LlavaOnevisionModel.pack_image_features(
        SimpleNamespace(config=config), [white.reshape(n_tiles, 27 * 27, 1).float()],
        torch.tensor([size[::-1]]), image_newline=torch.zeros(1),
        vision_aspect_ratio=config.vision_aspect_ratio)
    sees_white = packed[:, 0] > 0
    related, _ = anyres_masks([box], size, geometry)
    assert related.shape == sees_white.shape
    assert not (sees_white & ~related).any()  # nothing white outside the related features
    missed = int((related & ~sees_white).sum())
    assert missed <= 0.15 * int(related.sum()), (missed, int(related.sum()))
