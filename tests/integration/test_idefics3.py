"""Idefics3 / SmolVLM against Hugging Face's own model on the tiny random config
(``mmlens.zoo.tiny``), beside the conformance suite (``tests/conformance``: parity, padded
batches, generate, knockouts, sweep, lens, flow): the connector's features on examples with
different numbers of images, tiles with padded pixels (bucketed positions, masked keys), bf16,
every image-side hook on the data path; configs and pixels it cannot run are refused."""

import pytest
import torch
from hf_reference import hf_run
from PIL import Image

from mmlens import HookedMultimodalTransformer
from mmlens.zoo.tiny import tiny_hf_model, tiny_processor
from mmlens.zoo.tiny.idefics3 import SPECIALS, TILE, TOKENS_PER_TILE

IMAGE = SPECIALS.index("<image>")
PROMPT = "<|im_start|>User:{images}{question}<end_of_utterance>\nAssistant:"
# (width, height) per image of each example: 3x2, 2x3 and 3x3 tiles plus the global view;
# examples of different lengths (left padding) and with different numbers of images.
BATCHES = {
    "wide": [[(45, 29)]],
    "sizes-left-padded": [[(45, 29)], [(22, 38)], [(40, 40)]],
    "two-images-and-one": [[(22, 38), (45, 29)], [(40, 40)]],
}
QUESTIONS = ("What color is the square?", "Is the circle left or right of the square?",
             "Which shape is red?")


def _image(size, seed):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _inputs(processor, batch):
    images = [[_image(size, 10 * i + j) for j, size in enumerate(sizes)]
              for i, sizes in enumerate(batch)]
    texts = [PROMPT.format(images="<image>" * len(sizes), question=QUESTIONS[i % 3])
             for i, sizes in enumerate(batch)]
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))


def _ours(inputs, **kwargs):
    return dict(attention_mask=inputs["attention_mask"],
                image_sizes=inputs["pixel_attention_mask"], **kwargs)


@pytest.fixture(scope="module")
def hf():
    model = tiny_hf_model("idefics3")
    model.set_attn_implementation("eager")
    return model


@pytest.fixture(scope="module")
def processor(hf):
    return tiny_processor("idefics3", hf.config)


@pytest.fixture(scope="module")
def model(hf, processor):
    return HookedMultimodalTransformer.from_hf_model(hf, processor)


def _hf_run(hf, inputs):
    """HF's logits, vision block outputs, decoder layer inputs and outputs."""
    return hf_run(hf, inputs, hf.model.vision_model.encoder.layers, hf.model.text_model.layers)


def _check_parity(hf, model, inputs):
    ref, seen = _hf_run(hf, inputs)
    with torch.no_grad():
        logits, cache = model.run_with_cache(inputs["input_ids"], inputs["pixel_values"],
                                             **_ours(inputs))
    real = inputs["attention_mask"].bool()
    assert (ref.logits - logits)[real].abs().max() <= 1e-4
    assert len(seen["vision"]) == model.cfg.vision.n_layers
    for layer, theirs in enumerate(seen["vision"]):
        ours = cache[f"vision.blocks.{layer}.hook_resid_post"]
        assert (theirs - ours).abs().max() <= 1e-5, layer
    features = torch.cat(list(ref.image_outputs.pooler_output))
    ours = cache["connector.hook_out"].flatten(0, 1)
    assert (features - ours).abs().max() <= 1e-5
    for layer in range(model.cfg.n_layers):
        ours = cache[f"blocks.{layer}.hook_resid_pre"]
        assert (seen["pre"][layer] - ours)[real].abs().max() <= 1e-5, layer
        ours = cache[f"blocks.{layer}.hook_resid_post"]
        assert (seen["post"][layer] - ours)[real].abs().max() <= 1e-5, layer
    return cache


def test_connector_features_are_hfs_on_examples_of_several_images(hf, model, processor):
    inputs = _inputs(processor, BATCHES["two-images-and-one"])
    cache = _check_parity(hf, model, inputs)
    n_tiles = cache["vision.hook_embed"].shape[0]
    assert n_tiles >= 7 * 3  # several tiles per image and the global view
    assert int((inputs["input_ids"] == IMAGE).sum()) == n_tiles * TOKENS_PER_TILE


def test_padded_tiles_take_bucketed_positions_and_are_masked_as_hf(hf, model):
    """Tiles whose pixels are partly padding (HF's pixel_attention_mask): the valid patches
    spread over the position table, the padded ones masked as keys."""
    gen = torch.Generator().manual_seed(3)
    pixels = torch.randn(1, 3, 3, TILE, TILE, generator=gen)
    mask = torch.zeros(1, 3, TILE, TILE, dtype=torch.long)
    for tile, (h, w) in enumerate([(TILE, TILE), (16, 20), (9, 24)]):  # 9 px: a partial patch
        mask[0, tile, :h, :w] = 1
    pixels = pixels * mask[:, :, None]
    ids = torch.cat([torch.tensor([1, 20, 21]), torch.full((3 * TOKENS_PER_TILE,), IMAGE),
                     torch.tensor([22, 23])])[None]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
              "pixel_attention_mask": mask}
    cache = _check_parity(hf, model, inputs)
    positions = cache["vision.embed.hook_pos_embed"]
    assert not torch.equal(positions[0], positions[1])  # the 4x5 patches span the table


def test_bfloat16_runs_close_to_hf(processor):
    hf = tiny_hf_model("idefics3", dtype=torch.bfloat16)
    model = HookedMultimodalTransformer.from_hf_model(hf)
    inputs = _inputs(processor, BATCHES["sizes-left-padded"])
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    with torch.no_grad():
        ref = hf(**inputs).logits
        ours = model(inputs["input_ids"], inputs["pixel_values"], **_ours(inputs))
    assert ours.dtype == torch.bfloat16
    real = inputs["attention_mask"].bool()
    assert (ref.float().softmax(-1) - ours.float().softmax(-1))[real].abs().max() <= 2e-2


def test_every_image_side_hook_is_on_the_data_path(model, processor):
    inputs = _inputs(processor, BATCHES["wide"])
    args, kwargs = (inputs["input_ids"], inputs["pixel_values"]), _ours(inputs)
    with torch.no_grad():
        clean = model(*args, **kwargs)
    names = [n for n in model.hook_dict if n.startswith(("vision.", "connector."))
             and "hook_mask" not in n]
    assert {"vision.embed.hook_pos_embed", "vision.ln_post.hook_scale",
            "connector.hook_shuffled", "connector.hook_out"} <= set(names)

    def nudge(x, hook):
        gen = torch.Generator().manual_seed(0)
        return x + 0.5 * torch.randn(x.shape, generator=gen).to(x.dtype)

    for name in names:
        with torch.no_grad():
            edited = model.run_with_hooks(*args, fwd_hooks=[(name, nudge)], **kwargs)
        assert (edited - clean).abs().max() > 1e-4, name


@pytest.mark.parametrize("overrides, message", [
    (dict(scale_factor=4), "scale_factor"),
    (dict(text_config={"model_type": "qwen2"}), "llama"),
])
def test_configs_it_cannot_run_are_refused(overrides, message):
    from mmlens.model.families import from_hf_config
    from mmlens.zoo.tiny.idefics3 import hf_config

    with pytest.raises(ValueError, match=message):
        from_hf_config(hf_config(**overrides))


def test_pixels_of_another_layout_are_refused(model):
    ids = torch.tensor([[1, IMAGE, 2]])
    with pytest.raises(ValueError, match=r"\[tiles, 3, 24, 24\]"):
        model(ids, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="pixel_attention_mask"):
        model(ids, torch.randn(2, 3, TILE, TILE), image_sizes=torch.ones(1, TILE, TILE))
