"""Idefics3 / SmolVLM against Hugging Face's own model on the tiny random config
(``mmlens.zoo.tiny``): float32 parity of every vision block, the connector's features, every
residual stream and the logits on images cut into several tiles (left-padded batches, examples
with different numbers of images, tiles with padded pixels); knockout equals HF eager with an
edited mask; lens, generate, bf16; configs it cannot run are refused."""

import pytest
import torch
from PIL import Image

from mmlens import HookedMultimodalTransformer
from mmlens.methods import block_attention
from mmlens.methods.lens import decode, lens_names, residual_stack
from mmlens.zoo.tiny import tiny_hf_model, tiny_processor
from mmlens.zoo.tiny.idefics3 import SPECIALS, TILE, TOKENS_PER_TILE

IMAGE = SPECIALS.index("<image>")
PROMPT = "<|im_start|>User:{images}{question}<end_of_utterance>\nAssistant:"
# (width, height) per image of each example: 3x2, 2x3 and 3x3 tiles plus the global view;
# examples of different lengths (left padding) and with different numbers of images.
BATCHES = {
    "wide": [[(45, 29)]],
    "tall": [[(22, 38)]],
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
    seen = {"vision": [], "pre": [], "post": []}
    handles = [b.register_forward_hook(lambda m, a, out: seen["vision"].append(out))
               for b in hf.model.vision_model.encoder.layers]
    for layer in hf.model.text_model.layers:
        handles.append(layer.register_forward_pre_hook(
            lambda m, args, kwargs: seen["pre"].append(args[0] if args else
                                                       kwargs["hidden_states"]),
            with_kwargs=True))
        handles.append(layer.register_forward_hook(lambda m, a, out: seen["post"].append(out)))
    try:
        with torch.no_grad():
            out = hf(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return out, seen


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


@pytest.mark.parametrize("batch", list(BATCHES))
def test_float32_parity_with_hf(hf, model, processor, batch):
    inputs = _inputs(processor, BATCHES[batch])
    cache = _check_parity(hf, model, inputs)
    n_tiles = cache["vision.hook_embed"].shape[0]
    assert n_tiles >= 7 * len(BATCHES[batch])  # several tiles per image and the global view
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


def test_knockout_equals_hf_eager_with_an_edited_mask(hf, model, processor):
    inputs = _inputs(processor, BATCHES["sizes-left-padded"])
    layers, n = [0, 2], inputs["input_ids"].shape[0]
    images = [torch.nonzero(row == IMAGE)[:, 0] for row in inputs["input_ids"]]
    last = inputs["input_ids"].shape[1] - 1

    def edit(module, args, kwargs):
        mask = kwargs["attention_mask"]
        q_len = kwargs["hidden_states"].shape[1]
        mask = mask.expand(n, model.cfg.n_heads, q_len, q_len).clone()
        for i, image in enumerate(images):
            mask[i, :, last, image] = torch.finfo(mask.dtype).min
        kwargs["attention_mask"] = mask
        return args, kwargs

    handles = [hf.model.text_model.layers[layer].self_attn.register_forward_pre_hook(
        edit, with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            reference = hf(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()
    hooks = block_attention(images, [torch.tensor([last])] * n, layers)
    with torch.no_grad():
        clean = model(inputs["input_ids"], inputs["pixel_values"], **_ours(inputs))
        ours = model.run_with_hooks(inputs["input_ids"], inputs["pixel_values"],
                                    **_ours(inputs), fwd_hooks=hooks)
    real = inputs["attention_mask"].bool()
    assert (reference - ours)[real].abs().max() <= 1e-4
    assert (clean - ours)[:, -1].abs().max() > 1e-3  # the knockout changed the answer


def test_lens_at_the_last_layer_is_the_output(model, processor):
    inputs = _inputs(processor, BATCHES["sizes-left-padded"])
    with torch.no_grad():
        logits, cache = model.run_with_cache(inputs["input_ids"], inputs["pixel_values"],
                                             **_ours(inputs), names_filter=lens_names(model))
    stack, _ = residual_stack(cache, layers=[model.cfg.n_layers - 1])
    assert (decode(model, stack[0]) - logits[:, -1]).abs().max() <= 1e-5


def test_generate_equals_hf_greedy(hf, model, processor):
    inputs = _inputs(processor, BATCHES["two-images-and-one"])
    ref = hf.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0,
                      eos_token_id=None)
    ours = model.generate(inputs["input_ids"], inputs["pixel_values"], **_ours(inputs),
                          max_new_tokens=6, stop_at_eos=False)
    assert torch.equal(ref, ours)


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


VARIANTS = {
    "scale-3-mha-biases": dict(scale_factor=3, text_config={"num_key_value_heads": 4,
                                                            "attention_bias": True}),
    "tied-embeddings-gelu": dict(tie_word_embeddings=True,
                                 vision_config={"hidden_act": "gelu"}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_other_configs_match_hf(variant):
    hf = tiny_hf_model("idefics3", **VARIANTS[variant])
    processor = tiny_processor("idefics3", hf.config)
    scale = hf.config.scale_factor
    processor.image_seq_len = (TILE // hf.config.vision_config.patch_size // scale) ** 2
    model = HookedMultimodalTransformer.from_hf_model(hf, processor)
    inputs = _inputs(processor, BATCHES["two-images-and-one"])
    with torch.no_grad():
        ref = hf(**inputs).logits
        ours = model(inputs["input_ids"], inputs["pixel_values"], **_ours(inputs))
    real = inputs["attention_mask"].bool()
    assert (ref - ours)[real].abs().max() <= 1e-4


def test_smolvlm_matches_hf():
    hf = tiny_hf_model("smolvlm")
    model = HookedMultimodalTransformer.from_hf_model(hf)
    assert model.family.name == "smolvlm"
    inputs = _inputs(tiny_processor("smolvlm", hf.config), BATCHES["two-images-and-one"])
    with torch.no_grad():
        theirs = hf(**inputs).logits
        ours = model(inputs["input_ids"], inputs["pixel_values"], **_ours(inputs))
    real = inputs["attention_mask"].bool()
    assert (theirs - ours)[real].abs().max() <= 1e-4


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
