"""InternVL 3 through prepare and the study: a saved tiny folder loads (processor composed
without torchvision) and equals HF on processed images with their own prompt; HF's own tiling
and image-token run; related spans (through the image-token map) against a processor-painted
image, also padded to a square; ``mmlens hooks``; InternVL's presets."""

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mmlens import HookedMultimodalTransformer
from mmlens.cli import main
from mmlens.inputs.processor import ComposedProcessor
from mmlens.inputs.templates import INTERNVL
from mmlens.zoo.tiny import tiny_checkpoint, tiny_hf_model
from mmlens.zoo.tiny.internvl import IMAGE_SEQ_LENGTH, IMAGE_SIZES, SPECIALS, TILE

IMAGE = SPECIALS.index("<IMG_CONTEXT>")
QUESTIONS = ["What color is the square?", "Which shape is red?", "Is the circle left or right "
             "of the square?"]
# one box per tiny image size: across a tile border, in a corner, in the middle
BOXES = [[(25, 3, 14, 20)], [(0, 30, 11, 23)], [(17, 19, 15, 9)]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_checkpoint("internvl", tmp_path_factory.mktemp("internvl"),
                           text_config={"num_hidden_layers": 4})


@pytest.fixture(scope="module")
def model(folder):
    return HookedMultimodalTransformer.from_pretrained(str(folder))


def _painted(background=0, paint=255):
    images = []
    for size, ((x, y, w, h),) in zip(IMAGE_SIZES, BOXES, strict=True):
        pixels = np.full((size.height, size.width, 3), background, dtype=np.uint8)
        pixels[y:y + h, x:x + w] = paint
        images.append(Image.fromarray(pixels))
    return images


def test_saved_folder_loads_with_its_own_prompt_and_equals_hf(folder, model):
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor

    assert isinstance(model.processor, ComposedProcessor)
    assert model.family.prompt_template == INTERNVL.name
    images = _painted()
    batch = model.prepare(images, QUESTIONS)
    # HF's tiling: the PIL image processor with crop_to_patches, as HF's processor asks
    reference = GotOcr2ImageProcessorPil.from_pretrained(folder)(
        images, crop_to_patches=True, return_tensors="pt")
    assert reference["num_patches"].tolist() == [3, 3, 5]  # 2x1, 1x2, 2x2 tiles + thumbnails
    tiles = torch.cat([p[:n] for p, (n,) in zip(batch.pixel_values, batch.image_sizes.tolist(),
                                                strict=True)])
    assert batch.pixel_values.shape[:2] == (3, 5)  # zero padded to the most tiles
    assert torch.equal(tiles, reference["pixel_values"])
    assert torch.equal(batch.image_sizes, reference["num_patches"][:, None])  # a row an image
    # HF's image run, from HF's own InternVLProcessor.replace_image_token
    tokens = SimpleNamespace(start_image_token="<img>", end_image_token="</img>",
                             image_token="<IMG_CONTEXT>", image_seq_length=IMAGE_SEQ_LENGTH)
    tokenizer = model.processor.tokenizer
    for i, n in enumerate(reference["num_patches"].tolist()):
        run = InternVLProcessor.replace_image_token(tokens, {"num_patches": [n]}, 0)
        expected = INTERNVL.format(QUESTIONS[i]).replace("<image>", run)
        real = batch.input_ids[i, batch.attention_mask[i].bool()]
        assert real.tolist() == tokenizer(expected)["input_ids"]
        assert len(batch.positions("image", i)) == n * IMAGE_SEQ_LENGTH
    hf = type(tiny_hf_model("internvl")).from_pretrained(folder).eval()
    with torch.no_grad():
        ref = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 pixel_values=tiles).logits
        ours = model(batch)
    real = batch.attention_mask.bool()
    assert (ref - ours)[real].abs().max() <= 1e-4


def test_related_tokens_are_those_the_painted_box_reaches(model):
    """Paint each box white on black, run the processor, and read which image tokens' 8x8 px
    squares (2x2 patches of their tile, thumbnails included) the paint reaches."""
    images = _painted()
    batch = model.prepare(images, QUESTIONS, boxes=BOXES)
    pixels = torch.cat([p[:n] for p, (n,) in zip(batch.pixel_values, batch.image_sizes.tolist(),
                                                 strict=True)])  # black is -1, white +1
    per_side, token_px = TILE // 8, 8
    squares = pixels.reshape(-1, 3, per_side, token_px, per_side, token_px).permute(
        0, 2, 4, 1, 3, 5).flatten(3)  # [tiles, token row, token col, pixels]
    touched = (squares > -1 + 1e-6).any(-1)  # any paint, blur included
    solid = (squares > 0).any(-1)  # clearly painted pixels
    start = 0
    for i, (n,) in enumerate(batch.image_sizes.tolist()):
        image = batch.positions("image", i)
        related = torch.isin(image, batch.positions("related", i))
        other = torch.isin(image, batch.positions("other", i))
        assert torch.equal(related, ~other)
        reach = touched[start:start + n].flatten()
        clear = solid[start:start + n].flatten()
        assert bool(related[clear].all()), i  # every clearly painted token is related
        assert not bool(related[~reach].any()), i  # no related token is unpainted
        assert n > 1 and bool(related[-IMAGE_SEQ_LENGTH:].any()), i  # thumbnail included
        start += n


def test_padded_images_map_boxes_through_the_square(model):
    """``preprocessing="pad"`` tiles the padded square; its related tokens are those of the
    square image itself with the boxes moved onto it."""
    from mmlens.inputs.preprocessing import pad_to_square

    images = _painted()
    padded = model.prepare(images, QUESTIONS, boxes=BOXES, preprocessing="pad")
    squares = [pad_to_square(image, model.processor) for image in images]
    moved = [[(x + (max(i.size) - i.size[0]) // 2, y + (max(i.size) - i.size[1]) // 2, w, h)
              for x, y, w, h in boxes] for i, boxes in zip(images, BOXES, strict=True)]
    direct = model.prepare(squares, QUESTIONS, boxes=moved)
    assert torch.equal(padded.input_ids, direct.input_ids)
    for i in range(len(images)):
        assert torch.equal(padded.positions("related", i), direct.positions("related", i))
    assert not torch.equal(padded.positions("related", 0),
                           model.prepare(images[:1], QUESTIONS[:1], boxes=BOXES[:1])
                           .positions("related", 0))


def test_folder_without_an_image_processor_fails_at_load(folder, tmp_path):
    copy = shutil.copytree(folder, tmp_path / "copy")
    (copy / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match="no usable image processor"):
        HookedMultimodalTransformer.from_pretrained(str(copy))


def test_hooks_lists_the_internvl_hooks(folder, capsys):
    assert main(["hooks", "--model", str(folder)]) == 0
    listed = capsys.readouterr().out
    for name in ("vision.embed.hook_pos_embed", "vision.blocks.2.hook_attn_out",
                 "projector.hook_in", "projector.ln.hook_scale", "blocks.3.hook_resid_post"):
        assert name in listed


@pytest.mark.parametrize("name, n_layers", [("OpenGVLab/InternVL3-1B-hf", 24),
                                            ("OpenGVLab/InternVL3-8B-hf", 28)])
def test_presets_use_internvls_prompt_and_a_scaled_window(name, n_layers):
    from mmlens.experiments.presets import PRESETS
    from mmlens.methods.windows import default_window

    preset = PRESETS[name]
    assert preset.template is INTERNVL and preset.preprocessing == "dynamic_tiles"
    assert (preset.n_layers, preset.window) == (n_layers, default_window(n_layers))


def test_internvls_tiling_has_its_own_preprocessing_name(model):
    """InternVL's dynamic tiles plus thumbnail are recorded as ``dynamic_tiles`` (not
    LLaVA-NeXT's ``anyres``); the old name, as an old run folder holds it, is refused with
    the new one named."""
    from mmlens.experiments.presets import resolve_settings

    settings = resolve_settings(model, "none")
    assert settings.preprocessing == "dynamic_tiles"
    assert settings.prepare_options()["preprocessing"] is None
    with pytest.raises(ValueError, match="its processor's is 'dynamic_tiles'.*recorded as "
                                         "'anyres'"):
        resolve_settings(model, "none", preprocessing="anyres")
