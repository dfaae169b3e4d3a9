"""Llama-3.2-Vision (Mllama) against Hugging Face's own model on the tiny random config
(``mmlens.zoo.tiny.mllama``): float32 parity of every vision block (local and global), every
decoder layer and the logits on a left-padded batch of different images (odd sizes, one and
two tiles, several images in one prompt, none); the layer numbering; the gates and the
cross-attention's queries, keys, values and pattern on the data path (each edit equals HF with
the same edit); bf16 runs; bad input. Knockouts are in ``test_mllama_knockouts.py``; what every
family shares (generation, HF's names at the door, knockouts, the sweep, spans, causal maps,
the saved-folder study) is in ``tests/conformance``."""

import numpy as np
import pytest
import torch
from mllama_pair import (
    BATCHES,
    CROSS,
    _close,
    _hf_run,
    _images,
    _in_layer,
    _inputs,
    _ours,
    eager_hf,
    hooked,
    left_padded,
)

from mmlens import HookedMultimodalTransformer
from mmlens.core.errors import MMLensError
from mmlens.model.families.mllama import MllamaFamily
from mmlens.zoo.tiny import tiny_hf_model


@pytest.fixture(scope="module")
def hf():
    return eager_hf()


@pytest.fixture(scope="module")
def model(hf):
    return hooked(hf)


@pytest.fixture(scope="module")
def batch(model):
    return left_padded(model)


@pytest.mark.parametrize("batch", BATCHES)
def test_float32_parity_of_every_vision_block_decoder_layer_and_the_logits(hf, model, batch):
    image_ids, texts = BATCHES[batch]
    images = _images()
    inputs = _inputs(model, [[images[i] for i in row] for row in image_ids], texts)
    assert (inputs["attention_mask"] == 0).any()  # left padded
    positions = model.position_ids(inputs["input_ids"], inputs["attention_mask"])
    out, seen = _hf_run(hf, inputs, positions)
    logits, cache = _ours(model, inputs)
    real = inputs["attention_mask"].bool()
    assert (logits - out.logits)[real].abs().max() <= 1e-4
    ours_vision = [f"vision.blocks.{i}.hook_resid_post" for i in range(3)] + [
        f"vision.global_blocks.{i}.hook_resid_post" for i in range(2)]
    assert len(seen["vision"]) == len(ours_vision)
    for name, theirs in zip(ours_vision, seen["vision"], strict=True):
        assert (cache[name] - theirs).abs().max() <= 1e-5, name
    assert len(seen["post"]) == 4
    for layer, theirs in enumerate(seen["post"]):
        assert (cache[f"blocks.{layer}.hook_resid_post"] - theirs)[real].abs().max() <= 1e-5



def test_a_text_only_prompt_skips_the_cross_attention_layers_as_hf(hf, model):
    inputs = dict(model.processor.tokenizer(["What color is the square?", "Which shape?"],
                                            padding=True, return_tensors="pt"))
    positions = model.position_ids(inputs["input_ids"], inputs["attention_mask"])
    out, _ = _hf_run(hf, inputs, positions)
    logits, cache = _ours(model, inputs)
    real = inputs["attention_mask"].bool()
    assert (logits - out.logits)[real].abs().max() <= 1e-4
    for layer in CROSS:
        assert torch.equal(cache[f"blocks.{layer}.hook_resid_post"],
                           cache[f"blocks.{layer - 1}.hook_resid_post"])



def test_layers_are_numbered_as_hf_cross_attention_layers_included(model):
    names = model.hook_dict
    for layer in range(4):
        cross = layer in CROSS
        for hook in ("hook_q", "hook_k", "hook_v", "hook_mask", "hook_pattern", "hook_z"):
            assert (f"blocks.{layer}.cross_attn.{hook}" in names) == cross
            assert (f"blocks.{layer}.attn.{hook}" in names) == (not cross)
        for gate in ("hook_attn_gate", "hook_mlp_gate"):
            assert (f"blocks.{layer}.{gate}" in names) == cross
    assert model.cfg.text.cross_attention_layers == CROSS



@pytest.mark.parametrize("gate", ["hook_attn_gate", "hook_mlp_gate"])
def test_a_gate_set_by_its_hook_is_hf_with_that_gate(hf, model, batch, gate):
    inputs, positions = batch
    hf_name = {"hook_attn_gate": "cross_attn_attn_gate", "hook_mlp_gate": "cross_attn_mlp_gate"}
    param = getattr(hf.model.language_model.layers[2], hf_name[gate])
    saved = param.detach().clone()
    with torch.no_grad():
        param.fill_(float(np.arctanh(0.75)))
    try:
        out, _ = _hf_run(hf, inputs, positions)
    finally:
        with torch.no_grad():
            param.copy_(saved)
    hooks = [(f"blocks.2.{gate}", lambda g, hook: torch.full_like(g, 0.75))]
    logits, _ = _ours(model, inputs, hooks)
    assert _close(model, inputs, logits, out.logits)
    plain, _ = _ours(model, inputs)
    assert not _close(model, inputs, plain, out.logits)



def test_bf16_runs(hf, model, batch):
    inputs, _ = batch
    half = HookedMultimodalTransformer.from_hf_model(
        tiny_hf_model("mllama", dtype=torch.bfloat16), model.processor)
    logits, _ = _ours(half, inputs)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()



def test_resuming_before_a_cross_attention_layer_is_refused(model, batch):
    inputs, _ = batch
    resid = torch.zeros(2, inputs["input_ids"].shape[1], model.cfg.d_model)
    with pytest.raises(MMLensError, match="cross-attention layers"):
        model(resid, start_at_layer=2, attention_mask=inputs["attention_mask"])
    # a resumed run that stops before the next cross-attention layer needs no image
    out = model(resid, start_at_layer=0, stop_at_layer=1, attention_mask=inputs["attention_mask"])
    assert out.shape == resid.shape
    # nor one resumed after the last of them
    logits = model(resid, start_at_layer=3, attention_mask=inputs["attention_mask"])
    assert logits.shape[:2] == resid.shape[:2]



def test_the_processor_mask_rule_is_hfs():
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    from mmlens.model.families.mllama import cross_attention_token_mask

    image = 9
    rows = [[1, image, 2, 3, image, 4], [image, image, 2, 3, 4, 5], [1, 2, image, 3, 4, 5]]
    tiles = torch.tensor([[2, 1], [1, 2], [2, 0]])
    ours = cross_attention_token_mask(torch.tensor(rows), image, tiles, 2)
    sparse = [get_cross_attention_token_mask(row, image) for row in rows]
    theirs = convert_sparse_cross_attention_mask_to_dense(
        sparse, [[int(n) for n in t if n] for t in tiles], 2, len(rows[0]))
    assert torch.equal(ours, torch.from_numpy(theirs).bool())



def test_positions_after_a_cached_prompt_see_the_image_through_the_cache(model, batch):
    from mmlens.model.kv_cache import KeyValueCache

    inputs, _ = batch
    ids, pixels, ratios = inputs["input_ids"][:1], inputs["pixel_values"][:1], \
        inputs["aspect_ratio_ids"][:1]
    following = torch.tensor([[14, 17]])
    with torch.no_grad():
        full = model(torch.cat([ids, following], 1), pixels, image_sizes=ratios)[:, -2:]
        cache = KeyValueCache.empty(model.cfg.n_layers)
        model(ids, pixels, image_sizes=ratios, past_kv_cache=cache)
        assert cache.cross is not None
        resumed = model(following, past_kv_cache=cache)
        cache = KeyValueCache.empty(model.cfg.n_layers)
        model(ids, pixels, image_sizes=ratios, past_kv_cache=cache)
        cache.cross = None
        blind = model(following, past_kv_cache=cache)
    assert (resumed - full).abs().max() <= 1e-5
    assert (blind - full).abs().max() > 1e-4



def test_an_edited_cross_attention_mask_is_refused_naming_block_attention(model, batch):
    inputs, _ = batch
    edited = dict(inputs, cross_attention_mask=inputs["cross_attention_mask"].clone())
    edited["cross_attention_mask"][0, -1] = 0
    with pytest.raises(MMLensError, match="cross_attention_mask differs.*block_attention"):
        model(**edited)



def test_pixel_values_without_tiles_or_aspect_ratios_are_refused(model, batch):
    inputs, _ = batch
    with pytest.raises(MMLensError, match="aspect_ratio_ids"):
        model(inputs["input_ids"], inputs["pixel_values"], attention_mask=inputs["attention_mask"])
    with pytest.raises(MMLensError, match=r"\[batch, images, tiles, 3, H, W\]"):
        model(inputs["input_ids"], inputs["pixel_values"].flatten(0, 1),
              attention_mask=inputs["attention_mask"], image_sizes=inputs["aspect_ratio_ids"])



def test_a_preprocessing_mode_other_than_the_tiling_is_refused(model):
    with pytest.raises(MMLensError, match="tiles each image itself"):
        model.prepare(_images()[:1], ["Which shape is red?"], preprocessing="pad")



def test_intermediate_layers_outside_the_local_transformer_are_refused():
    from mmlens.zoo.tiny.mllama import hf_config

    config = hf_config(vision_config=dict(intermediate_layers_indices=[0, 5]))
    with pytest.raises(MMLensError, match="must be local vision layers"):
        MllamaFamily().read_config(config)



def test_prompts_with_different_image_counts_in_one_batch_are_hfs_batch(hf, model):
    """Two images beside one, and one beside a text-only prompt (``prepare`` pads the image
    axis with padding images as HF's processor does) equal HF on the same batch. Not each
    prompt alone: a text row that sees no image (before the image token, or a text-only
    prompt) averages every key of its prompt, the padding images' included (HF's rule), so
    such rows depend on the batch's padding images, in HF as here."""
    a, b, c = _images()
    questions = ["What color is the square?", "Which shape is red?"]
    for images, per_prompt in (([[a, b], c], [[a, b], [c]]), ([c, None], [[c], []])):
        batch = model.prepare(images, questions)
        text = [p.replace("<image>", "<|image|>") for p in batch.prompts]
        inputs = _inputs(model, per_prompt, text)
        assert torch.equal(batch.input_ids * batch.attention_mask,
                           inputs["input_ids"] * inputs["attention_mask"])
        with torch.no_grad():
            ours, reference = model(batch), hf(**inputs).logits
            alone = model(model.prepare(images[1:], questions[1:]))
        real = batch.attention_mask.bool()
        assert (ours - reference)[real].abs().max() <= 1e-4
        assert (ours[1, -alone.shape[1]:] - alone[0]).abs().max() > 1e-4  # HF's rule



def test_pixel_values_for_fewer_prompts_than_have_an_image_are_refused(model):
    batch = model.prepare([_images()[0], _images()[1]], ["What color?", "Which shape?"])
    with pytest.raises(MMLensError, match="one row per prompt"):
        model(batch.input_ids, batch.pixel_values[:1], attention_mask=batch.attention_mask,
              image_sizes=batch.image_sizes[:1])



def _delta(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))



@pytest.mark.parametrize("hook", ["hook_q", "hook_k", "hook_v", "hook_pattern"])
def test_a_cross_attention_hook_edit_is_hf_with_the_same_edit(hf, model, batch, hook):
    """What ``blocks.1.cross_attn.{hook}`` returns flows on: queries / keys shifted, values
    halved, the pattern zeroed equal HF with ``q_proj`` / ``k_proj`` outputs shifted by the same
    amounts, ``v_proj``'s halved, ``o_proj``'s input zeroed."""
    inputs, positions = batch
    cfg = model.cfg.text
    n, length = inputs["input_ids"].shape
    with torch.no_grad():
        _, seen = model.run_with_cache(**inputs, names_filter="blocks.1.cross_attn.hook_k")
    n_keys = seen["blocks.1.cross_attn.hook_k"].shape[1]
    shift = {"hook_q": _delta((n, length, cfg.n_heads, cfg.d_head), 0),
             "hook_k": _delta((n, n_keys, cfg.n_key_value_heads, cfg.d_head), 1)}
    ours = {"hook_q": lambda x, hook: x + shift["hook_q"],
            "hook_k": lambda x, hook: x + shift["hook_k"],
            "hook_v": lambda x, hook: x * 0.5, "hook_pattern": lambda x, hook: x * 0}[hook]
    projection = {"hook_q": "q_proj", "hook_k": "k_proj", "hook_v": "v_proj",
                  "hook_pattern": "o_proj"}[hook]

    def theirs(layer, module):
        target = getattr(module, projection)
        if hook == "hook_pattern":
            return [target.register_forward_pre_hook(lambda m, args: (args[0] * 0,))]
        if hook == "hook_v":
            return [target.register_forward_hook(lambda m, args, out: out * 0.5)]
        return [target.register_forward_hook(
            lambda m, args, out: out + shift[hook].reshape(out.shape))]  # HF: per tile

    out, _ = _hf_run(hf, inputs, positions, _in_layer(1, theirs))
    logits, _ = _ours(model, inputs, [(f"blocks.1.cross_attn.{hook}", ours)])
    assert _close(model, inputs, logits, out.logits)
    plain, _ = _ours(model, inputs)
    assert not _close(model, inputs, plain, out.logits)
