"""Idefics3 / SmolVLM through the study: a saved tiny folder loads and runs with its own prompt
and equals HF; spans from boxes follow the processor's tiling (checked against painted images
and the processor's own tile grid); ``mmlens hooks`` and ``mmlens flow`` offline; the fast sweep
equals the naive one."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mmlens import HookedMultimodalTransformer
from mmlens.cli import main
from mmlens.core.errors import MMLensError
from mmlens.core.sizes import ImageSize
from mmlens.experiments import information_flow
from mmlens.inputs.idefics3_geometry import TileGeometry
from mmlens.inputs.templates import IDEFICS3
from mmlens.zoo.tiny import tiny_checkpoint, tiny_hf_model
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


def test_saved_folder_loads_with_its_own_prompt_and_equals_hf(folder, model):
    hf = type(tiny_hf_model("idefics3")).from_pretrained(folder).eval()
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
    with torch.no_grad():
        ref = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 pixel_values=batch.pixel_values,
                 pixel_attention_mask=batch.image_sizes).logits
        ours = model(batch)
    real = batch.attention_mask.bool()
    assert (ref - ours)[real].abs().max() <= 1e-4


@pytest.mark.parametrize("size", [(45, 29), (22, 38), (40, 40), (7, 90), (300, 11), (24, 24),
                                  (13, 13), (72, 48)])
def test_tile_grid_and_token_count_are_the_processors(model, size):
    geometry = TileGeometry.from_processor(model.processor.image_processor, model.cfg.vision)
    image = Image.new("RGB", size)
    out = model.processor.image_processor([[image]], return_row_col_info=True)
    assert geometry.grid(size) == (out["rows"][0][0], out["cols"][0][0])
    text = model.processor(images=[image], text=["<image>"], return_tensors="pt")
    n_tokens = int((text["input_ids"] == model.cfg.image_token_id).sum())
    assert geometry.n_tokens(size) == n_tokens == out["pixel_values"].shape[1] * TOKENS_PER_TILE


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
    positions = torch.arange(1000, 1000 + lit.numel())
    related, other = model.family.box_positions(model, ImageSize.of(image), [box],
                                                positions, "resize")
    assert torch.equal(related, positions[lit])
    assert torch.equal(other, positions[~lit])
    tiles = lit[:-TOKENS_PER_TILE].reshape(6, TOKENS_PER_TILE)
    assert tiles.any(1).sum() >= 1 and lit[-TOKENS_PER_TILE:].any()  # a tile and the global


def test_a_box_over_tile_borders_reaches_every_tile_it_touches(model):
    # the centre of a resized 45x29 image (72x48): the box spans all six tiles
    related, _ = model.family.box_positions(model, ImageSize.of(Image.new("RGB", (45, 29))),
                                            [(10, 5, 25, 19)], torch.arange(7 * 9), "resize")
    assert set((related // TOKENS_PER_TILE).tolist()) == set(range(7))


def test_spans_refuse_an_image_token_count_of_another_image(model):
    with pytest.raises(MMLensError, match="image tokens"):
        model.family.box_positions(model, ImageSize.of(Image.new("RGB", (45, 29))), [(0, 0, 4, 4)],
                                   torch.arange(5 * 9), "resize")


def test_hooks_lists_the_tower_and_connector(folder, capsys):
    assert main(["hooks", "--model", str(folder)]) == 0
    listed = capsys.readouterr().out
    for name in ("vision.embed.hook_pos_embed", "vision.ln_post.hook_scale",
                 "connector.hook_shuffled", "connector.hook_out", "blocks.3.hook_resid_post"):
        assert name in listed


def test_flow_runs_offline(folder, tmp_path):
    out = tmp_path / "run"
    code = main(["flow", "--model", str(folder), "--per-task", "1", "--no-filter", "--quiet",
                 "--tasks", "ChooseAttr,QueryAttr", "--flows", "image->last,related->last",
                 "--out", str(out)])
    assert code == 0
    frame = pd.read_csv(out / "flow.csv")
    assert set(frame.flow) == {"image->last", "related->last"}
    assert (out / "report.html").is_file()


def test_fast_sweep_equals_naive(model):
    images, boxes = _images()
    batch = model.prepare(images, QUESTIONS, boxes=boxes)
    flows = ["image->last", "related->last", "other->last", "question->last"]
    runs = {method: information_flow(model, batch, flows=flows, window=1, method=method,
                                     only_correct=False)
            for method in ("fast", "naive")}
    fast, naive = (runs[m].sort_values(["example_id", "flow", "layer"]) for m in runs)
    assert np.abs(fast.p_block.to_numpy() - naive.p_block.to_numpy()).max() <= 1e-5
    assert (fast.p_block - fast.p_base).abs().max() > 1e-5


def test_a_saved_smolvlm_folder_loads_without_torchvision_and_equals_hf(tmp_path):
    folder = tiny_checkpoint("smolvlm", tmp_path / "smolvlm")
    model = HookedMultimodalTransformer.from_pretrained(str(folder))
    assert model.family.name == "smolvlm" and model.processor.image_seq_len == TOKENS_PER_TILE
    hf = type(tiny_hf_model("smolvlm")).from_pretrained(folder).eval()
    images, boxes = _images()
    batch = model.prepare(images, QUESTIONS, boxes=boxes)
    with torch.no_grad():
        ref = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 pixel_values=batch.pixel_values,
                 pixel_attention_mask=batch.image_sizes).logits
        ours = model(batch)
    real = batch.attention_mask.bool()
    assert (ref - ours)[real].abs().max() <= 1e-4
    config = folder / "processor_config.json"
    config.write_text(config.read_text().replace('"image_seq_len": 9', '"image_seq_len": 16'))
    with pytest.raises(MMLensError, match="image_seq_len 16"):
        HookedMultimodalTransformer.from_pretrained(str(folder))


def test_vision_tower_spans_are_refused_not_guessed(model):
    # the image-token -> tower-patch map through the pixel shuffle is not built yet: a span on
    # vision hooks is refused with what to do instead
    images, boxes = _images()
    batch = model.prepare(images, QUESTIONS, boxes=boxes)
    with pytest.raises(ValueError, match="explicit patch indices"):
        batch.vision_positions("related")
