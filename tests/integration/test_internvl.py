"""InternVL 3 against Hugging Face's own model on the tiny random config (``mmlens.zoo.tiny``):
float32 parity of every vision block, the projected features, every residual stream and the
logits on tiled images with thumbnails and a left-padded batch; knockout equals HF eager with an
edited mask; lens, generate, bf16; other configs; configs it cannot run."""

import pytest
import torch
from hf_reference import hf_knockout_logits, hf_run

from mmlens import HookedMultimodalTransformer
from mmlens.methods import block_attention
from mmlens.methods.lens import decode, lens_names, residual_stack
from mmlens.zoo.tiny import tiny_hf_model, tiny_processor
from mmlens.zoo.tiny.internvl import IMAGE_SEQ_LENGTH, SPECIALS, TILE

IMAGE = SPECIALS.index("<IMG_CONTEXT>")
START, END = SPECIALS.index("<img>"), SPECIALS.index("</img>")
# tiles per image (thumbnails included): 1 (no thumbnail), 2x1 + thumbnail, 2x2 + thumbnail;
# left padding of different lengths
BATCHES = {
    "one-tile": ([1], None),
    "three-tiles": ([3], None),
    "five-tiles": ([5], None),
    "tiles-left-padded": ([3, 1, 5], [0, 4, 2]),
}


def _inputs(tiles, pad=None, prefix=3, suffix=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.cat([torch.randint(8, 90, (prefix,), generator=gen), torch.tensor([START]),
                       torch.full((n * IMAGE_SEQ_LENGTH,), IMAGE), torch.tensor([END]),
                       torch.randint(8, 90, (suffix,), generator=gen)]) for n in tiles]
    pad = pad or [0] * len(tiles)
    width = max(len(r) + p for r, p in zip(rows, pad, strict=True))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    pixels = torch.randn(sum(tiles), 3, TILE, TILE, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def _ours(inputs):
    return (inputs["input_ids"], inputs["pixel_values"]), {
        "attention_mask": inputs["attention_mask"]}


@pytest.fixture(scope="module")
def hf():
    model = tiny_hf_model("internvl")
    model.set_attn_implementation("eager")
    return model


@pytest.fixture(scope="module")
def model(hf):
    return HookedMultimodalTransformer.from_hf_model(hf, tiny_processor("internvl", hf.config))


def _hf_run(hf, inputs):
    return hf_run(hf, inputs, hf.model.vision_tower.encoder.layer)


@pytest.mark.parametrize("batch", list(BATCHES))
def test_float32_parity_with_hf(hf, model, batch):
    inputs = _inputs(*BATCHES[batch])
    ref, seen = _hf_run(hf, inputs)
    args, kwargs = _ours(inputs)
    with torch.no_grad():
        logits, cache = model.run_with_cache(*args, **kwargs)
    real = inputs["attention_mask"].bool()
    assert (ref.logits - logits)[real].abs().max() <= 1e-4
    assert len(seen["vision"]) == model.cfg.vision.n_layers == 3
    for layer, theirs in enumerate(seen["vision"]):
        ours = cache[f"vision.blocks.{layer}.hook_resid_post"]
        assert (theirs - ours).abs().max() <= 1e-5, layer
    features = ref.image_outputs.pooler_output
    assert features.shape[:2] == (inputs["pixel_values"].shape[0], IMAGE_SEQ_LENGTH)
    assert (features - cache["projector.hook_out"]).abs().max() <= 1e-5
    for layer in range(model.cfg.n_layers):
        for when, name in (("pre", "hook_resid_pre"), ("post", "hook_resid_post")):
            ours = cache[f"blocks.{layer}.{name}"]
            assert (seen[when][layer] - ours)[real].abs().max() <= 1e-5, (layer, when)


def test_pixel_shuffle_token_holds_its_two_by_two_patches(model):
    """Token ``(r, c)`` of a tile is the channels of patches ``(2r..2r+1, 2c..2c+1)``, in
    reading order: what ``internvl_spans`` assumes."""
    inputs = _inputs(*BATCHES["one-tile"])
    args, kwargs = _ours(inputs)
    with torch.no_grad():
        _, cache = model.run_with_cache(*args, **kwargs)
    grid = model.cfg.vision.image_size // model.cfg.vision.patch_size
    patches = cache[f"vision.blocks.{model.cfg.vision.n_layers - 1}.hook_resid_post"][0, 1:]
    patches = patches.reshape(grid, grid, -1)
    shuffled = cache["projector.hook_in"][0].reshape(grid // 2, grid // 2, 4, -1)
    for r in range(grid // 2):
        for c in range(grid // 2):
            block = patches[2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(4, -1)
            assert torch.equal(shuffled[r, c], block)


def test_knockout_equals_hf_eager_with_an_edited_mask(hf, model):
    inputs = _inputs(*BATCHES["tiles-left-padded"])
    layers, n = [0, 2], inputs["input_ids"].shape[0]
    images = [torch.nonzero(row == IMAGE)[:, 0] for row in inputs["input_ids"]]
    last = inputs["input_ids"].shape[1] - 1
    reference = hf_knockout_logits(hf, inputs, layers, images, last, model.cfg.n_heads)
    hooks = block_attention(images, [torch.tensor([last])] * n, layers)
    args, kwargs = _ours(inputs)
    with torch.no_grad():
        clean = model(*args, **kwargs)
        ours = model.run_with_hooks(*args, **kwargs, fwd_hooks=hooks)
    real = inputs["attention_mask"].bool()
    assert (reference - ours)[real].abs().max() <= 1e-4
    assert (clean - ours)[:, -1].abs().max() > 1e-3  # the knockout changes the answer


def test_lens_at_the_last_layer_is_the_output(model):
    args, kwargs = _ours(_inputs(*BATCHES["tiles-left-padded"]))
    with torch.no_grad():
        logits, cache = model.run_with_cache(*args, **kwargs, names_filter=lens_names(model))
    stack, _ = residual_stack(cache, layers=[model.cfg.n_layers - 1])
    assert (decode(model, stack[0]) - logits[:, -1]).abs().max() <= 1e-5


def test_generate_equals_hf_greedy(hf, model):
    inputs = _inputs(*BATCHES["tiles-left-padded"])
    ref = hf.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0,
                      eos_token_id=None)
    args, kwargs = _ours(inputs)
    ours = model.generate(*args, **kwargs, max_new_tokens=6, stop_at_eos=False)
    assert torch.equal(ref, ours)


def test_bfloat16_runs_close_to_hf():
    hf = tiny_hf_model("internvl", dtype=torch.bfloat16)
    model = HookedMultimodalTransformer.from_hf_model(hf)
    inputs = _inputs(*BATCHES["tiles-left-padded"])
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    args, kwargs = _ours(inputs)
    with torch.no_grad():
        ref = hf(**inputs).logits
        ours = model(*args, **kwargs)
    assert ours.dtype == torch.bfloat16
    real = inputs["attention_mask"].bool()
    assert (ref.float().softmax(-1) - ours.float().softmax(-1))[real].abs().max() <= 2e-2


def test_every_image_side_hook_is_on_the_data_path(model):
    args, kwargs = _ours(_inputs(*BATCHES["three-tiles"]))
    with torch.no_grad():
        clean = model(*args, **kwargs)
    names = [n for n in model.hook_dict if n.startswith(("vision.", "projector."))]
    assert {"vision.embed.hook_pos_embed", "vision.blocks.2.hook_mlp_out", "projector.hook_in",
            "projector.ln.hook_scale"} <= set(names)

    def nudge(x, hook):
        if x.dtype.is_floating_point:
            gen = torch.Generator().manual_seed(0)
            return x + 0.5 * torch.randn(x.shape, generator=gen).to(x.dtype)
        blocked = x.clone()  # the vision mask: nothing attends to the class token
        blocked[..., 1:, 0] = False
        return blocked

    for name in names:
        with torch.no_grad():
            edited = model.run_with_hooks(*args, fwd_hooks=[(name, nudge)], **kwargs)
        assert (edited - clean).abs().max() > 1e-4, name


VARIANTS = {
    "rms-norm-no-qkv-bias": dict(vision_config={"norm_type": "rms_norm",
                                                "attention_bias": False}),
    "final-norm": dict(vision_config={"use_mean_pooling": False}),
    "second-to-last-layer": dict(vision_feature_layer=-2),
    "untied-mha-decoder": dict(tie_word_embeddings=False,
                               text_config={"tie_word_embeddings": False,
                                            "num_key_value_heads": 4}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_other_configs_match_hf(variant):
    hf = tiny_hf_model("internvl", **VARIANTS[variant])
    model = HookedMultimodalTransformer.from_hf_model(hf)
    inputs = _inputs(*BATCHES["tiles-left-padded"])
    args, kwargs = _ours(inputs)
    with torch.no_grad():
        ref = hf(**inputs)
        ours = model(*args, **kwargs)
    real = inputs["attention_mask"].bool()
    assert (ref.logits - ours)[real].abs().max() <= 1e-4


@pytest.mark.parametrize("overrides, message", [
    (dict(vision_config={"use_qk_norm": True}), "use_qk_norm"),
    (dict(vision_feature_select_strategy="full"), "class token"),
    (dict(vision_feature_layer=[-1, -2]), "list"),
    (dict(downsample_ratio=0.25), "downsample_ratio"),
    (dict(image_seq_length=16), "image_seq_length"),
    (dict(vision_config={"image_size": 20}), "even number"),
])
def test_configs_it_cannot_run_are_refused(overrides, message):
    from mmlens.model.families import from_hf_config
    from mmlens.zoo.tiny.internvl import hf_config

    with pytest.raises(ValueError, match=message):
        from_hf_config(hf_config(**overrides))


def test_tiles_of_another_size_are_refused(model):
    inputs = _inputs(*BATCHES["one-tile"])
    with pytest.raises(ValueError, match="24x24 tiles"):
        model(inputs["input_ids"], inputs["pixel_values"][..., :20, :20])


def test_padded_tiles_equal_flat_tiles_and_need_their_counts(model):
    inputs = _inputs(*BATCHES["tiles-left-padded"])
    flat = inputs["pixel_values"]  # 3 + 1 + 5 tiles
    padded = torch.zeros(3, 5, *flat.shape[1:])
    for i, (start, n) in enumerate([(0, 3), (3, 1), (4, 5)]):
        padded[i, :n] = flat[start:start + n]
    counts = torch.tensor([[3], [1], [5]])
    with torch.no_grad():
        ref = model(inputs["input_ids"], flat, attention_mask=inputs["attention_mask"])
        ours = model(inputs["input_ids"], padded, attention_mask=inputs["attention_mask"],
                     image_sizes=counts)
        assert torch.equal(ref, ours)
        with pytest.raises(ValueError, match="without image_sizes"):
            model(inputs["input_ids"], padded, attention_mask=inputs["attention_mask"])
        with pytest.raises(ValueError, match="do not fit"):
            model(inputs["input_ids"], padded, attention_mask=inputs["attention_mask"],
                  image_sizes=torch.tensor([[3], [6], [5]]))
