"""Qwen3-VL against Hugging Face's own model on the tiny random config (``mmlens.zoo.tiny``):
float32 parity of every vision block, the DeepStack features, every residual stream and the
logits; HF's 3D positions; the DeepStack hook zeroed equals HF with that feature zeroed;
knockout equals HF eager with an edited mask; lens, generate, bf16, resuming."""

import pytest
import torch
from hf_reference import hf_knockout_logits, hf_run

from mmlens import HookedMultimodalTransformer
from mmlens.core.errors import MMLensError
from mmlens.methods import block_attention, remove_deepstack
from mmlens.methods.lens import decode, lens_names, residual_stack
from mmlens.zoo.tiny import tiny_hf_model, tiny_processor
from mmlens.zoo.tiny.qwen3_vl import MERGE, PATCH, SPECIALS, TEMPORAL

IMAGE = SPECIALS.index("<|image_pad|>")
START, END = SPECIALS.index("<|vision_start|>"), SPECIALS.index("<|vision_end|>")
# Patch grids (rows, cols): merged grids 3x3, 2x5, 5x3 and odd ones, so the 4x4 table of
# learned positions is resampled, not copied; left padding of different lengths.
BATCHES = {
    "square": ([(6, 6)], None),
    "wide": ([(4, 10)], None),
    "tall": ([(10, 6)], None),
    "sizes-left-padded": ([(6, 10), (4, 4), (14, 6)], [0, 5, 2]),
}


def _inputs(grids, pad=None, prefix=3, suffix=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.cat([torch.randint(8, 90, (prefix,), generator=gen), torch.tensor([START]),
                       torch.full((h * w // MERGE**2,), IMAGE), torch.tensor([END]),
                       torch.randint(8, 90, (suffix,), generator=gen)]) for h, w in grids]
    pad = pad or [0] * len(grids)
    width = max(len(r) + p for r, p in zip(rows, pad, strict=True))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    grid = torch.tensor([[1, h, w] for h, w in grids])
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * TEMPORAL * PATCH**2, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
            "image_grid_thw": grid, "mm_token_type_ids": (ids == IMAGE).int()}


def _ours(model, inputs, **kwargs):
    return dict(attention_mask=inputs["attention_mask"], image_sizes=inputs["image_grid_thw"],
                **kwargs)


@pytest.fixture(scope="module")
def hf():
    model = tiny_hf_model("qwen3_vl")
    model.set_attn_implementation("eager")
    return model


@pytest.fixture(scope="module")
def model(hf):
    return HookedMultimodalTransformer.from_hf_model(hf, tiny_processor("qwen3_vl", hf.config))


def _hf_run(hf, inputs):
    return hf_run(hf, inputs, hf.model.visual.blocks)


@pytest.mark.parametrize("batch", list(BATCHES))
def test_float32_parity_with_hf(hf, model, batch):
    inputs = _inputs(*BATCHES[batch])
    ref, seen = _hf_run(hf, inputs)
    with torch.no_grad():
        logits, cache = model.run_with_cache(inputs["input_ids"], inputs["pixel_values"],
                                             **_ours(model, inputs))
    real = inputs["attention_mask"].bool()
    assert (ref.logits - logits)[real].abs().max() <= 1e-4
    for layer, theirs in enumerate(seen["vision"]):
        ours = cache[f"vision.blocks.{layer}.hook_resid_post"][0]
        assert (theirs - ours).abs().max() <= 1e-5, layer
    features = torch.cat(list(ref.image_outputs.pooler_output))
    assert (features - cache["merger.hook_out"][0]).abs().max() <= 1e-5
    deep = ref.image_outputs.deepstack_features
    assert len(deep) == model.cfg.text.deepstack_layers == 2
    is_image = inputs["input_ids"] == IMAGE
    for j, per_image in enumerate(deep):
        theirs = torch.cat(list(per_image))
        assert (theirs - cache[f"deepstack.{j}.hook_out"][0]).abs().max() <= 1e-5
        injected = cache[f"blocks.{j}.hook_deepstack"]
        assert (theirs - injected[is_image]).abs().max() <= 1e-5
        assert not injected[~is_image].any()  # added at the image tokens only
    for layer in range(model.cfg.n_layers):
        ours = cache[f"blocks.{layer}.hook_resid_pre"]
        assert (seen["pre"][layer] - ours)[real].abs().max() <= 1e-5, layer
        # HF's layer output is before the DeepStack addition; ours includes it
        added = cache[f"blocks.{layer}.hook_deepstack"] if layer < 2 else 0
        ours = cache[f"blocks.{layer}.hook_resid_post"] - added
        assert (seen["post"][layer] - ours)[real].abs().max() <= 1e-5, layer


def test_positions_are_hf_get_rope_index(hf, model):
    inputs = _inputs(*BATCHES["sizes-left-padded"])
    ref, _ = hf.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
    ours = model.position_ids(inputs["input_ids"], inputs["attention_mask"],
                              image_sizes=inputs["image_grid_thw"])
    assert torch.equal(ref, ours)


@pytest.mark.parametrize("layer", [0, 1])
def test_zeroed_deepstack_hook_equals_hf_without_that_feature(hf, model, layer, monkeypatch):
    inputs = _inputs(*BATCHES["sizes-left-padded"])
    text = type(hf.model.language_model)
    original, calls = text._deepstack_process, []

    def without_one(self, hidden, masks, embeds):
        calls.append(len(calls))
        return hidden if calls[-1] == layer else original(self, hidden, masks, embeds)

    monkeypatch.setattr(text, "_deepstack_process", without_one)
    with torch.no_grad():
        reference = hf(**inputs).logits
    monkeypatch.undo()
    assert len(calls) == 2
    with torch.no_grad():
        clean = model(inputs["input_ids"], inputs["pixel_values"], **_ours(model, inputs))
        removed = model.run_with_hooks(
            inputs["input_ids"], inputs["pixel_values"], **_ours(model, inputs),
            fwd_hooks=[(f"blocks.{layer}.hook_deepstack", lambda x, hook: torch.zeros_like(x))])
        by_factory = model.run_with_hooks(
            inputs["input_ids"], inputs["pixel_values"], **_ours(model, inputs),
            fwd_hooks=remove_deepstack(model, [layer]))
    real = inputs["attention_mask"].bool()
    assert (reference - removed)[real].abs().max() <= 1e-4
    assert torch.equal(removed, by_factory)
    assert (clean - removed)[real].abs().max() > 1e-3


def test_remove_deepstack_refuses_layers_without_injection(model):
    with pytest.raises(MMLensError, match="DeepStack"):
        remove_deepstack(model, [2])


def test_knockout_equals_hf_eager_with_an_edited_mask(hf, model):
    inputs = _inputs(*BATCHES["sizes-left-padded"])
    layers, n = [0, 2], inputs["input_ids"].shape[0]
    images = [torch.nonzero(row == IMAGE)[:, 0] for row in inputs["input_ids"]]
    last = inputs["input_ids"].shape[1] - 1
    reference = hf_knockout_logits(hf, inputs, layers, images, last, model.cfg.n_heads)
    hooks = block_attention(images, [torch.tensor([last])] * n, layers)
    with torch.no_grad():
        ours = model.run_with_hooks(inputs["input_ids"], inputs["pixel_values"],
                                    **_ours(model, inputs), fwd_hooks=hooks)
    real = inputs["attention_mask"].bool()
    assert (reference - ours)[real].abs().max() <= 1e-4


def test_lens_at_the_last_layer_is_the_output(model):
    inputs = _inputs(*BATCHES["sizes-left-padded"])
    with torch.no_grad():
        logits, cache = model.run_with_cache(inputs["input_ids"], inputs["pixel_values"],
                                             **_ours(model, inputs),
                                             names_filter=lens_names(model))
    stack, _ = residual_stack(cache, layers=[model.cfg.n_layers - 1])
    assert (decode(model, stack[0]) - logits[:, -1]).abs().max() <= 1e-5


def test_generate_equals_hf_greedy(hf, model):
    inputs = _inputs(*BATCHES["sizes-left-padded"])
    ref = hf.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0,
                      eos_token_id=None)
    ours = model.generate(inputs["input_ids"], inputs["pixel_values"], **_ours(model, inputs),
                          max_new_tokens=6, stop_at_eos=False)
    assert torch.equal(ref, ours)


def test_bfloat16_runs_close_to_hf():
    hf = tiny_hf_model("qwen3_vl", dtype=torch.bfloat16)
    model = HookedMultimodalTransformer.from_hf_model(hf)
    inputs = _inputs(*BATCHES["sizes-left-padded"])
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    with torch.no_grad():
        ref = hf(**inputs).logits
        ours = model(inputs["input_ids"], inputs["pixel_values"], **_ours(model, inputs))
    assert ours.dtype == torch.bfloat16
    real = inputs["attention_mask"].bool()
    assert (ref.float().softmax(-1) - ours.float().softmax(-1))[real].abs().max() <= 2e-2


def test_resuming_needs_the_injections_and_equals_the_full_run(model):
    inputs = _inputs(*BATCHES["sizes-left-padded"])
    kwargs = _ours(model, inputs)
    names = ["blocks.0.hook_resid_pre", "blocks.0.hook_deepstack", "blocks.1.hook_deepstack"]
    with torch.no_grad():
        full, cache = model.run_with_cache(inputs["input_ids"], inputs["pixel_values"],
                                           **kwargs, names_filter=names)
        positions = model.position_ids(inputs["input_ids"], inputs["attention_mask"],
                                       image_sizes=inputs["image_grid_thw"])
        resume = dict(start_at_layer=0, attention_mask=inputs["attention_mask"],
                      position_ids=positions)
        with pytest.raises(MMLensError, match="injections="):
            model(cache["blocks.0.hook_resid_pre"], **resume)
        resumed = model(cache["blocks.0.hook_resid_pre"], **resume, injections={
            layer: cache[f"blocks.{layer}.hook_deepstack"] for layer in (0, 1)})
    assert torch.equal(full, resumed)


def test_decompose_resid_adds_up_with_the_deepstack_additions(model):
    inputs = _inputs(*BATCHES["square"])
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs["input_ids"], inputs["pixel_values"],
                                        **_ours(model, inputs))
    parts = cache.decompose_resid(layer=3).sum(0)
    added = cache["blocks.0.hook_deepstack"] + cache["blocks.1.hook_deepstack"]
    resid = cache["blocks.2.hook_resid_post"]
    assert (parts - resid).abs().max() > 1e-2  # TransformerLens leaves the additions out
    assert (parts + added - resid).abs().max() <= 1e-5


def test_injections_and_removal_positions_are_checked(model):
    inputs = _inputs(*BATCHES["sizes-left-padded"])
    with pytest.raises(ValueError, match="start_at_layer"):
        model(inputs["input_ids"], inputs["pixel_values"], **_ours(model, inputs),
              injections={})
    hooks = remove_deepstack(model, 0, positions=[torch.tensor([4])])
    with pytest.raises(MMLensError, match="positions for 1 examples"):
        model.run_with_hooks(inputs["input_ids"], inputs["pixel_values"],
                             **_ours(model, inputs), fwd_hooks=hooks)


def test_every_image_side_hook_is_on_the_data_path(model):
    inputs = _inputs(*BATCHES["tall"])
    args, kwargs = (inputs["input_ids"], inputs["pixel_values"]), _ours(model, inputs)
    with torch.no_grad():
        clean = model(*args, **kwargs)
    names = [n for n in model.hook_dict
             if n.startswith(("vision.", "merger.", "deepstack.")) or "deepstack" in n]
    assert {"vision.hook_pos_embed", "blocks.0.hook_deepstack", "deepstack.1.hook_out"} <= set(
        names)

    def nudge(x, hook):
        if x.dtype.is_floating_point:
            gen = torch.Generator().manual_seed(0)
            return x + 0.5 * torch.randn(x.shape, generator=gen).to(x.dtype)
        blocked = x.clone()
        blocked[..., 1:, 0] = False
        return blocked

    for name in names:
        with torch.no_grad():
            edited = model.run_with_hooks(*args, fwd_hooks=[(name, nudge)], **kwargs)
        assert (edited - clean).abs().max() > 1e-4, name


VARIANTS = {
    "unsorted-deepstack": dict(vision_config={"deepstack_visual_indexes": [2, 0]}),
    "more-deepstack-than-blocks": dict(vision_config={"deepstack_visual_indexes": [0, 1, 2]},
                                       text_config={"num_hidden_layers": 2}),
    "biases-tied-embeddings": dict(text_config={"attention_bias": True},
                                   tie_word_embeddings=True),
    "8x8-table-one-injection": dict(vision_config={"num_position_embeddings": 64,
                                                   "deepstack_visual_indexes": [1]}),
    "mha-equal-sections": dict(text_config={
        "num_key_value_heads": 4, "head_dim": 12,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                            "mrope_section": [2, 2, 2], "mrope_interleaved": True}}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_other_configs_match_hf(variant):
    hf = tiny_hf_model("qwen3_vl", **VARIANTS[variant])
    model = HookedMultimodalTransformer.from_hf_model(hf)
    inputs = _inputs(*BATCHES["sizes-left-padded"])
    with torch.no_grad():
        ref = hf(**inputs)
        ours = model(inputs["input_ids"], inputs["pixel_values"], **_ours(model, inputs))
    real = inputs["attention_mask"].bool()
    assert (ref.logits - ours)[real].abs().max() <= 1e-4
    n_injected = min(len(ref.image_outputs.deepstack_features), model.cfg.n_layers)
    assert [n for n in model.hook_dict if n.endswith("hook_deepstack")] == [
        f"blocks.{layer}.hook_deepstack" for layer in range(n_injected)]


@pytest.mark.parametrize("vision, message", [
    ({"deepstack_visual_indexes": [0, 3]}, "deepstack_visual_indexes"),
    ({"deepstack_visual_indexes": [1, 1]}, "deepstack_visual_indexes"),
    ({"num_position_embeddings": 15}, "square"),
])
def test_configs_it_cannot_run_are_refused(vision, message):
    from mmlens.model.families import from_hf_config
    from mmlens.zoo.tiny.qwen3_vl import hf_config

    with pytest.raises(ValueError, match=message):
        from_hf_config(hf_config(vision_config=vision))
