"""Attention knockout against Hugging Face's eager attention with an edited mask, and its
invariants: image independence, no-op on no layers, fast path kept, key/value cache, errors."""

import re

import pytest
import torch
from conftest_interventions import hf_logits, tiny_batch, tiny_pair
from torch.nn import functional as F

from mmlens import KeyValueCache
from mmlens.methods import block_attention, window_layers


@pytest.fixture(scope="module")
def models():
    return tiny_pair()


@pytest.fixture(scope="module")
def batch(models):
    return tiny_batch(models[0].config, batch=2, pad=[0, 2])


def _edges(spec, batch, i):
    return batch.positions(spec, i) if isinstance(spec, str) else torch.as_tensor(spec[i])


def _reference_hooks(layers, batch, src, dst, heads, n_heads):
    """Forward pre-hooks for HF attention modules: blocked edges' mask entries SET to the min."""

    def edit(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        n, q_len = kwargs["hidden_states"].shape[:2]
        minimum = torch.finfo(kwargs["hidden_states"].dtype).min
        if mask is None:
            mask = torch.zeros(n, 1, q_len, q_len).masked_fill(
                torch.ones(q_len, q_len, dtype=torch.bool).triu(1), minimum)
        mask = mask.expand(n, n_heads, q_len, q_len).clone()
        for i in range(n):
            rows, cols = _edges(dst, batch, i), _edges(src, batch, i)
            for head in heads if heads is not None else range(n_heads):
                mask[i, head, rows[:, None], cols[None, :]] = minimum
        kwargs["attention_mask"] = mask
        return args, kwargs

    return {layer: edit for layer in layers}


@pytest.mark.parametrize("src, dst, layers, heads", [
    ("image", "last", [0, 1, 2], None),
    ("image", "question", [1], None),
    ("question", "last", [0, 2], [1, 3]),
    ([[1, 2], [3]], [[20, 21], [25, 27]], [0, 1], [0]),
])
def test_language_knockout_matches_hf_eager_reference(models, batch, src, dst, layers, heads):
    hf, model = models
    edits = _reference_hooks(layers, batch, src, dst, heads, model.cfg.n_heads)
    handles = [hf.model.language_model.layers[layer].self_attn.register_forward_pre_hook(
        fn, with_kwargs=True) for layer, fn in edits.items()]
    try:
        reference = hf_logits(hf, batch)
    finally:
        for handle in handles:
            handle.remove()
    hooks = block_attention(src, dst, layers, batch=batch, heads=heads, model=model)
    with torch.no_grad():
        ours = model.run_with_hooks(batch, fwd_hooks=hooks)
        clean = model(batch)
    real = batch.attention_mask.bool()
    assert (ours - reference)[real].abs().max() <= 1e-4
    assert (ours - clean)[real].abs().max() > 1e-3  # the knockout did something


def test_vision_knockout_matches_hf_eager_reference(models, batch):
    hf, model = models
    src, dst, layers = [1, 2, 3, 9], [0, 4, 7], [0, 1]
    n_tokens = model.cfg.vision.n_patches + 1

    def edit(module, args, kwargs):
        n = kwargs["hidden_states"].shape[0]
        mask = torch.zeros(n, 1, n_tokens, n_tokens)
        mask[:, :, torch.tensor(dst)[:, None], torch.tensor(src)[None, :]] = torch.finfo(
            mask.dtype).min
        kwargs["attention_mask"] = mask
        return args, kwargs

    encoder = hf.model.vision_tower.encoder
    handles = [encoder.layers[layer].self_attn.register_forward_pre_hook(edit, with_kwargs=True)
               for layer in layers]
    try:
        reference = hf_logits(hf, batch)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        ours = model.run_with_hooks(
            batch, fwd_hooks=block_attention(src, dst, layers, tower="vision", model=model))
    real = batch.attention_mask.bool()
    assert (ours - reference)[real].abs().max() <= 1e-4
    assert (ours - hf_logits(hf, batch))[real].abs().max() > 1e-3


def test_blocking_image_to_text_makes_text_independent_of_image(models, batch):
    _, model = models
    after_image = [batch.positions("question", i).tolist() + batch.positions("last", i).tolist()
                   for i in range(len(batch))]
    hooks = block_attention("image", after_image, range(model.cfg.n_layers), batch=batch)
    other_pixels = torch.randn_like(batch.pixel_values)
    with torch.no_grad():
        first = model.run_with_hooks(batch, fwd_hooks=hooks)
        second = model.run_with_hooks(batch.input_ids, other_pixels,
                                      attention_mask=batch.attention_mask, fwd_hooks=hooks)
        unblocked = model(batch.input_ids, other_pixels, attention_mask=batch.attention_mask)
    for i, positions in enumerate(after_image):
        assert torch.allclose(first[i, positions], second[i, positions], atol=1e-5)
        assert not torch.allclose(first[i, positions], unblocked[i, positions], atol=1e-3)


def test_no_layers_changes_nothing(models, batch):
    _, model = models
    assert block_attention("image", "last", [], batch=batch) == []
    with torch.no_grad():
        assert torch.equal(model.run_with_hooks(batch, fwd_hooks=block_attention(
            "image", "last", [], batch=batch)), model(batch))


def test_knockout_keeps_sdpa_and_matches_explicit_path(models, batch, monkeypatch):
    _, model = models
    hooks = block_attention("image", "question", [0, 1], batch=batch)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    with torch.no_grad():
        fast = model.run_with_hooks(batch, fwd_hooks=hooks)
    assert len(calls) == model.cfg.n_layers + model.cfg.vision.n_layers
    monkeypatch.undo()
    no_op = [(f"blocks.{layer}.attn.hook_pattern", lambda pattern, hook: pattern)
             for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        explicit = model.run_with_hooks(batch, fwd_hooks=hooks + no_op)
    real = batch.attention_mask.bool()
    assert (fast - explicit)[real].abs().max() <= 1e-5


def test_cache_shows_blocked_edges_and_per_head_masks(models, batch):
    _, model = models
    shapes = []
    hooks = block_attention("image", "last", [1], batch=batch, heads=[2], model=model)
    seen = [("blocks.1.attn.hook_mask", lambda mask, hook: shapes.append(mask.shape))]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks + seen):
        logits, cache = model.run_with_cache(batch)
    assert shapes == [torch.Size([2, model.cfg.n_heads, batch.input_ids.shape[1],
                                  batch.input_ids.shape[1]])]
    pattern = cache["blocks.1.attn.hook_pattern"]
    for i in range(len(batch)):
        last, image = batch.positions("last", i), batch.positions("image", i)
        assert pattern[i, 2, last[:, None], image].abs().max() == 0
        assert pattern[i, 0, last[:, None], image].sum() > 1e-3
    with torch.no_grad():
        assert torch.allclose(logits, model.run_with_hooks(batch, fwd_hooks=hooks), atol=1e-5)


def test_knockout_with_key_value_cache_equals_full_run(models, batch):
    _, model = models
    hooks = block_attention("image", "question", [0, 2], batch=batch)
    split = max(int(image[-1]) for image in batch.span("image")) + 1  # inside row 0's question
    assert split > int(batch.positions("question", 0)[0])
    with torch.no_grad():
        full = model.run_with_hooks(batch, fwd_hooks=hooks)
        cache = KeyValueCache.empty(model.cfg.n_layers)
        with model.hooks(fwd_hooks=hooks):
            head = model(batch.input_ids[:, :split], batch.pixel_values,
                         attention_mask=batch.attention_mask[:, :split], past_kv_cache=cache)
            tail = model(batch.input_ids[:, split:], attention_mask=batch.attention_mask[:, split:],
                         past_kv_cache=cache)
    real = batch.attention_mask.bool()
    assert (torch.cat([head, tail], 1) - full)[real].abs().max() <= 1e-4


def test_knockout_resumed_from_frozen_cache_equals_full_run(models):
    hf, model = models
    one = tiny_batch(hf.config, batch=1)
    start, split = 1, 20
    layers = window_layers(center=1, k=3, n_layers=model.cfg.n_layers)[start:]
    hooks = block_attention("image", "last", layers, batch=one)
    with torch.no_grad():
        full = model.run_with_hooks(one, fwd_hooks=hooks)
        clean = model(one)
        cache = KeyValueCache.empty(model.cfg.n_layers)
        model(one.input_ids[:, :split], one.pixel_values, past_kv_cache=cache)
        resid = model(one, stop_at_layer=start)[:, split:].expand(3, -1, -1)
        resumed = model.run_with_hooks(
            resid, start_at_layer=start, past_kv_cache=cache.expand(3),
            attention_mask=torch.ones(3, resid.shape[1]),
            fwd_hooks=block_attention(one.span("image") * 3, one.span("last") * 3, layers))
    assert (resumed - full[:, split:]).abs().max() <= 1e-4
    assert (resumed - clean[:, split:]).abs().max() > 1e-3


def test_generate_with_knockout_same_with_and_without_cache(models, batch):
    _, model = models
    hooks = block_attention("image", "last", [0, 1], batch=batch)
    with_cache = model.generate(batch, max_new_tokens=4, fwd_hooks=hooks)
    without = model.generate(batch, max_new_tokens=4, fwd_hooks=hooks, use_past_kv_cache=False)
    assert torch.equal(with_cache, without)


def test_user_hooks_compose(models, batch):
    _, model = models
    both = block_attention("image", "last", [1], batch=batch) + block_attention(
        "question", "last", [1], batch=batch)
    together = [[*batch.positions("image", i).tolist(), *batch.positions("question", i).tolist()]
                for i in range(len(batch))]
    with torch.no_grad():
        composed = model.run_with_hooks(batch, fwd_hooks=both)
        single = model.run_with_hooks(batch, fwd_hooks=block_attention(
            together, "last", [1], batch=batch))
    assert torch.allclose(composed, single, atol=1e-6)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(src="questoin", dst="last"), KeyError, "Did you mean question"),
    (dict(src="image", dst=[500]), IndexError, "position 500"),
    (dict(src="related", dst="last"), ValueError, "span 'related' is empty in example 1"),
    (dict(src="image", dst="last", layers=[3]), ValueError, "layer 3 is outside"),
    (dict(src="image", dst="last", layers=[-1]), ValueError, "layer -1 is outside"),
    (dict(src="image", dst="last", heads=[4]), ValueError, "heads [4] are outside 0..3"),
    (dict(src="image", dst="last", heads=[1], model=None), ValueError, "heads= needs model="),
    (dict(src="image", dst=[-2]), IndexError, "negative position -2"),
    (dict(src=[[1], [2], [3]], dst="last"), ValueError, "positions for 3 examples"),
    (dict(src="image", dst=[[]] * 2), ValueError, "dst of example 0 is empty"),
    (dict(src="image", dst="last", tower="vision"), ValueError, "on the vision tower"),
    (dict(src=[0], dst=[40], tower="vision"), IndexError, "vision tower (CLS + patches)"),
    (dict(src="image", dst="last", tower="audio"), ValueError, "tower='audio'"),
])
def test_bad_input_raises_before_running(models, batch, kwargs, error, message):
    _, model = models
    batch.add_span("related", [[5, 6], []])
    arguments = dict(layers=[0], batch=batch, model=model) | kwargs
    with pytest.raises(error, match=re.escape(message)):
        block_attention(arguments.pop("src"), arguments.pop("dst"), arguments.pop("layers"),
                        **arguments)


def test_errors_at_hook_time(models, batch):
    hf, model = models
    hooks = block_attention("image", "last", [0], batch=batch)
    one = tiny_batch(hf.config, batch=1)
    with pytest.raises(ValueError, match="built for a batch of 2 examples but the model runs 1"):
        model.run_with_hooks(one, fwd_hooks=hooks)
    with pytest.raises(ValueError, match="position 0 of example 0 .* would attend to nothing"):
        model.run_with_hooks(one, fwd_hooks=block_attention([0], [0, 5], [1]))
    with pytest.raises(KeyError, match="unknown hook name 'blocks.7.attn.hook_mask'"):
        model.run_with_hooks(one, fwd_hooks=block_attention([1], [3], [7]))


def test_attention_mass_is_zero_on_blocked_edges(models, batch):
    from mmlens.plotting import attention_mass, image_attention

    _, model = models
    with torch.no_grad(), model.hooks(fwd_hooks=block_attention("image", "last", [1],
                                                                batch=batch)):
        _, cache = model.run_with_cache(batch)
    mass = attention_mass(cache, batch, "image", "last")
    assert (mass[mass["layer"] == 1]["mass"] == 0).all()
    assert (mass[mass["layer"] != 1]["mass"] > 0).all()
    figure = image_attention(cache, batch, model.cfg.vision.grid_size, layer=0, example=1)
    assert torch.tensor(figure.data[0].z).shape == (4, 4)


def test_zero_and_mean_ablation(models, batch):
    from mmlens.methods import ablate_positions

    _, model = models
    zero = ablate_positions("hook_embed", "image", batch=batch)
    with torch.no_grad():
        first = model.run_with_hooks(batch, fwd_hooks=zero)
        second = model.run_with_hooks(batch.input_ids, torch.randn_like(batch.pixel_values),
                                      attention_mask=batch.attention_mask, fwd_hooks=zero)
        _, cache = model.run_with_cache(batch)
    real = batch.attention_mask.bool()
    assert torch.allclose(first[real], second[real], atol=1e-5)  # the image is gone
    name = "blocks.1.hook_resid_pre"
    means = {name: cache[name].mean((0, 1))}
    seen = []
    mean = ablate_positions(name, "question", batch=batch, means=means)
    with torch.no_grad():
        model.run_with_hooks(batch, fwd_hooks=mean + [(name, lambda x, hook: seen.append(x))])
    for i in range(len(batch)):
        question = batch.positions("question", i)
        assert torch.equal(seen[0][i, question], means[name].expand(len(question), -1))
        before = torch.arange(int(question[0]))
        assert torch.allclose(seen[0][i, before], cache[name][i, before], atol=1e-6)
    with pytest.raises(KeyError, match="means has no entry for hook_embed"):
        ablate_positions("hook_embed", "image", batch=batch, means=means)
    with pytest.raises(ValueError, match="given for 2 examples but the model runs 1"):
        model.run_with_hooks(batch.select([0]), fwd_hooks=zero)
