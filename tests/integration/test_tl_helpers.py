"""TransformerLens's ActivationCache helpers work on the model (its `patching` functions are
checked in test_patching.py)."""

import torch
from tiny import tiny_inputs, tiny_llava
from transformer_lens import ActivationCache

from mmlens import HookedMultimodalTransformer


def _model_and_inputs():
    hf = tiny_llava()
    return HookedMultimodalTransformer.from_hf_model(hf), tiny_inputs(hf.config, seed=4)


def test_cache_is_an_activation_cache_and_resid_decomposes():
    model, inputs = _model_and_inputs()
    with torch.no_grad():
        logits, cache = model.run_with_cache(inputs["input_ids"], inputs["pixel_values"])
    assert isinstance(cache, ActivationCache)
    n = model.cfg.n_layers
    accumulated = cache.accumulated_resid(layer=n)
    assert accumulated.shape[0] == n + 1
    torch.testing.assert_close(accumulated[-1], cache[f"blocks.{n - 1}.hook_resid_post"])
    parts = cache.decompose_resid(layer=n)
    torch.testing.assert_close(parts.sum(0), cache[f"blocks.{n - 1}.hook_resid_post"],
                               atol=1e-5, rtol=1e-5)
    heads = cache.stack_head_results(layer=n)
    assert heads.shape[0] == n * model.cfg.n_heads
    per_layer = heads.reshape(n, model.cfg.n_heads, *heads.shape[1:]).sum(1)
    for layer in range(n):
        torch.testing.assert_close(per_layer[layer], cache[f"blocks.{layer}.hook_attn_out"],
                                   atol=1e-5, rtol=1e-5)


def test_logit_attrs_sum_to_the_logit_difference():
    model, inputs = _model_and_inputs()
    with torch.no_grad():
        logits, cache = model.run_with_cache(inputs["input_ids"], inputs["pixel_values"])
    a, b = 5, 7
    stack, _ = cache.decompose_resid(layer=model.cfg.n_layers, pos_slice=-1, return_labels=True)
    attrs = cache.logit_attrs(stack, tokens=torch.tensor([a]), incorrect_tokens=torch.tensor([b]),
                              pos_slice=-1)
    expected = logits[0, -1, a] - logits[0, -1, b]
    torch.testing.assert_close(attrs.sum(0).squeeze(), expected, atol=1e-4, rtol=1e-4)
