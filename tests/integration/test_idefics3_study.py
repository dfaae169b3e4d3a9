"""Idefics3 / SmolVLM through the study, beside the conformance suite (``tests/conformance``):
a saved tiny folder loads with its own prompt and tile markers; the image-token map
(``mmlens.inputs.layouts.split_tiles``) follows the processor's tiling, checked against the
processor's own tile grid and against painted images (related / other spans, every tile a box
reaches, the vision-tower patches of each token); ``mmlens hooks`` lists the tower and the
connector; a SmolVLM folder loads without torchvision."""

import numpy as np
import pytest
import torch
from PIL import Image

from mmlens import HookedMultimodalTransformer
from mmlens.cli import main
from mmlens.core.errors import MMLensError
from mmlens.core.sizes import ImageSize
from mmlens.experiments.report.views import view_grid
from mmlens.inputs.templates import IDEFICS3
from mmlens.inputs.token_map import check_token_count
from mmlens.zoo.tiny import tiny_checkpoint
from mmlens.zoo.tiny.idefics3 import PATCH, SCALE, TOKENS_PER_TILE

QUESTIONS = ["What color is the square?", "Which shape is red?"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_checkpoint("idefics3", tmp_path_factory.mktemp("idefics3"),
                           text_config={"num_hidden_layers": 4})


@pytest.fixture(scope="module")
def model(folder):
    return HookedMultimodalTransformer.from_pretrained(str(folder))


def _painted(width, height, box):
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    x, y, w, h = box
    pixels[y:y + h, x:x + w] = 255
    return Image.fromarray(pixels)


def _images():
    boxes = [(8, 0, 8, 8), (0, 20, 12, 10)]
    images = [_painted(45, 29, boxes[0]), _painted(22, 38, boxes[1])]
    return images, [[box] for box in boxes]


def test_prepare_writes_the_tile_markers_before_the_image_tokens(model):
    images, boxes = _images()
    batch = model.prepare(images, QUESTIONS, boxes=boxes)
    assert model.family.prompt_template == IDEFICS3.name
    tokens = model.processor.tokenizer.convert_ids_to_tokens(batch.input_ids[0])
    assert "<row_2_col_3>" in tokens and "<global-img>" in tokens  # 2x3 tiles, global view
    for i in range(2):
        assert len(batch.positions("image", i)) == 7 * TOKENS_PER_TILE
        # the markers before the first tile's tokens are text: the end of the system span
        last_system = int(batch.positions("system", i)[-1])
        marker = model.processor.tokenizer.convert_ids_to_tokens(
            int(batch.input_ids[i, last_system]))
        assert marker == "<row_1_col_1>"
        kinds = batch.token_maps[i][0].kinds
        assert kinds == ["tile"] * 6 * TOKENS_PER_TILE + ["thumbnail"] * TOKENS_PER_TILE


@pytest.mark.parametrize("size", [(45, 29), (22, 38), (40, 40), (7, 90), (300, 11), (24, 24),
                                  (13, 13), (72, 48)])
def test_tile_grid_and_token_count_are_the_processors(model, size):
    layout = model.family.image_layout(model)
    image = Image.new("RGB", size)
    out = model.processor.image_processor([[image]], return_row_col_info=True)
    assert layout.grid(size) == (out["rows"][0][0], out["cols"][0][0])
    text = model.processor(images=[image], text=["<image>"], return_tensors="pt")
    n_tokens = int((text["input_ids"] == model.cfg.image_token_id).sum())
    assert len(layout.token_map(size)) == n_tokens == out["pixel_values"].shape[1] * TOKENS_PER_TILE


def _lit_tokens(processor, image, threshold):
    """Per image token (tiles, then the global view): the mean brightness its pixels show."""
    out = processor.image_processor([[image]])
    pixels = torch.as_tensor(np.asarray(out["pixel_values"]))[0] * 0.5 + 0.5  # [tiles, 3, T, T]
    side = PATCH * SCALE
    squares = pixels.mean(1).unfold(1, side, side).unfold(2, side, side)
    return squares.mean((-1, -2)).flatten() > threshold


@pytest.mark.parametrize("box", [(24, 16, 24, 16), (0, 0, 24, 16), (48, 32, 24, 16)])
def test_related_tokens_are_the_ones_a_painted_box_lights(model, box):
    # 72x48 is the processor's own size (no resize before the 3x2 tiles): tiles light exactly;
    # the global view (a 3x downscale) lights the tokens the box covers, a fringe only past it.
    image = _painted(72, 48, box)
    lit = _lit_tokens(model.processor, image, 0.25)
    batch = model.prepare([image], QUESTIONS[:1], boxes=[[box]])
    positions = batch.positions("image", 0)
    assert torch.equal(batch.positions("related", 0), positions[lit])
    assert torch.equal(batch.positions("other", 0), positions[~lit])
    tiles = lit[:-TOKENS_PER_TILE].reshape(6, TOKENS_PER_TILE)
    assert tiles.any(1).sum() >= 1 and lit[-TOKENS_PER_TILE:].any()  # a tile and the global


def test_a_box_over_tile_borders_reaches_every_tile_it_touches(model):
    # the centre of a resized 45x29 image (72x48): the box spans all six tiles
    token_map = model.family.image_layout(model).token_map(ImageSize(45, 29))
    related = token_map.related([(10, 5, 25, 19)]).nonzero().flatten().tolist()
    assert {token_map.tokens[k].tile for k in related} == set(range(7))


def test_vision_spans_are_each_tokens_shuffled_patches_in_its_tiles_row(model):
    # token (r, c) of a tile is the pixel shuffle of patches (SCALE r + i, SCALE c + j)
    image = _painted(72, 48, (24, 16, 24, 16))
    lit = _lit_tokens(model.processor, image, 0.25).reshape(7, TOKENS_PER_TILE)
    batch = model.prepare([image], QUESTIONS[:1], boxes=[[(24, 16, 24, 16)]])
    rows = batch.vision_positions("related", model)
    side, per_side = model.cfg.vision.image_size // PATCH, model.cfg.vision.image_size // (
        PATCH * SCALE)
    assert len(rows) == 7  # six tiles and the global view, one tower row each
    for tile, row in enumerate(rows):
        expected = sorted((SCALE * (k // per_side) + i) * side + SCALE * (k % per_side) + j
                          for k in lit[tile].nonzero().flatten().tolist()
                          for i in range(SCALE) for j in range(SCALE))
        assert row.tolist() == expected, tile


def test_spans_refuse_an_image_token_count_of_another_image(model):
    token_map = model.family.image_layout(model).token_map(ImageSize(45, 29))
    with pytest.raises(MMLensError, match="image tokens"):
        check_token_count(token_map, 5 * TOKENS_PER_TILE, "example 0")


def test_hooks_lists_the_tower_and_connector(folder, capsys):
    assert main(["hooks", "--model", str(folder)]) == 0
    listed = capsys.readouterr().out
    for name in ("vision.embed.hook_pos_embed", "vision.ln_post.hook_scale",
                 "connector.hook_shuffled", "connector.hook_out", "blocks.3.hook_resid_post"):
        assert name in listed


def test_a_saved_smolvlm_folder_loads_without_torchvision_and_refuses_a_foreign_seq_len(tmp_path):
    folder = tiny_checkpoint("smolvlm", tmp_path / "smolvlm")
    model = HookedMultimodalTransformer.from_pretrained(str(folder))
    assert model.family.name == "smolvlm" and model.processor.image_seq_len == TOKENS_PER_TILE
    images, boxes = _images()
    batch = model.prepare(images, QUESTIONS, boxes=boxes)
    assert len(batch.positions("related", 0)) > 0
    config = folder / "processor_config.json"
    config.write_text(config.read_text().replace('"image_seq_len": 9', '"image_seq_len": 16'))
    with pytest.raises(MMLensError, match="image_seq_len 16"):
        HookedMultimodalTransformer.from_pretrained(str(folder))


def test_the_view_draws_the_global_view_whole(model):
    # tile 0 is only the top-left tile: the view draws the global view, the image's last tile
    images, boxes = _images()
    images[1] = _painted(40, 40, (0, 20, 12, 10))  # 3x3 tiles: example 0's frames are padded
    batch = model.prepare(images, QUESTIONS, boxes=boxes)
    assert batch.pixel_values.shape[1] == 10 and not batch.image_sizes[0, 7:].any()
    grid = view_grid(model, batch)
    side = int(TOKENS_PER_TILE ** 0.5)
    assert (grid.rows, grid.cols, grid.cell_px) == (side, side, PATCH * SCALE)
    assert torch.equal(grid.positions, batch.positions("image", 0)[-TOKENS_PER_TILE:])
    out = model.processor.image_processor([[images[0]]], return_tensors="pt")
    assert torch.equal(grid.pixels, out["pixel_values"][0, -1])
