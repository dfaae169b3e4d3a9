"""LLaVA-1.5 beyond the conformance suite (``tests/conformance``, which checks float32 parity on
every tiny variant): bfloat16 parity, the explicit and fast attention paths, generation with and
without the cache, seeded sampling."""

import torch
from tiny import hf_image_features, tiny_inputs, tiny_llava

from mmlens import HookedMultimodalTransformer


def _compare(hf, inputs, dtype_tol):
    model = HookedMultimodalTransformer.from_hf_model(hf)
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(**inputs, position_ids=positions, output_hidden_states=True)
        logits, cache = model.run_with_cache(
            inputs["input_ids"], inputs["pixel_values"], attention_mask=mask)
        fast = model(inputs["input_ids"], inputs["pixel_values"], attention_mask=mask)
    real = mask.bool()
    features = cache["projector.hook_out"]
    diffs = {
        "logits": (ref.logits - logits)[real].abs().max().item(),
        "fast_vs_cached": (fast - logits)[real].abs().max().item(),
        "softmax": (ref.logits.float().softmax(-1) - logits.float().softmax(-1))[real]
        .abs().max().item(),
        "image_features": (hf_image_features(ref).reshape(features.shape) - features)
        .abs().max().item(),
    }
    for layer in range(model.cfg.n_layers):
        ours = cache[f"blocks.{layer}.hook_resid_pre"]
        diffs[f"resid_pre.{layer}"] = (ref.hidden_states[layer] - ours)[real].abs().max().item()
    return diffs


def test_bfloat16_parity():
    hf = tiny_llava(dtype=torch.bfloat16)
    inputs = tiny_inputs(hf.config, batch=2, pad=[0, 2])
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    diffs = _compare(hf, inputs, 5e-2)
    assert diffs["logits"] <= 5e-2, diffs
    assert diffs["softmax"] <= 1e-2, diffs


def test_explicit_and_fast_attention_paths_agree():
    hf = tiny_llava()
    model = HookedMultimodalTransformer.from_hf_model(hf)
    inputs = tiny_inputs(hf.config, batch=2, pad=[0, 2])
    with torch.no_grad():
        fast = model(inputs["input_ids"], inputs["pixel_values"],
                     attention_mask=inputs["attention_mask"])
        names = [n for n in model.hook_dict if n.endswith("hook_pattern")]
        explicit = model.run_with_hooks(
            inputs["input_ids"], inputs["pixel_values"], attention_mask=inputs["attention_mask"],
            fwd_hooks=[(n, lambda x, hook: x) for n in names])
    real = inputs["attention_mask"].bool()
    assert (fast - explicit)[real].abs().max() <= 1e-5


def test_generate_with_and_without_the_key_value_cache_agree():
    hf = tiny_llava()
    model = HookedMultimodalTransformer.from_hf_model(hf)
    inputs = tiny_inputs(hf.config, batch=2, pad=[0, 3])
    ours = model.generate(inputs["input_ids"], inputs["pixel_values"],
                          attention_mask=inputs["attention_mask"], max_new_tokens=8,
                          eos_token_id=None)
    no_cache = model.generate(inputs["input_ids"], inputs["pixel_values"],
                              attention_mask=inputs["attention_mask"], max_new_tokens=8,
                              eos_token_id=None, use_past_kv_cache=False)
    assert torch.equal(ours, no_cache)


def test_sampling_is_seeded_and_respects_hooks():
    hf = tiny_llava()
    model = HookedMultimodalTransformer.from_hf_model(hf)
    inputs = tiny_inputs(hf.config)
    args = (inputs["input_ids"], inputs["pixel_values"])
    a = model.generate(*args, max_new_tokens=6, do_sample=True, seed=3, eos_token_id=None)
    b = model.generate(*args, max_new_tokens=6, do_sample=True, seed=3, eos_token_id=None)
    assert torch.equal(a, b)
    greedy = model.generate(*args, max_new_tokens=6, eos_token_id=None)
    steer = [("ln_final.hook_normalized", lambda x, hook: x * 0 + x[..., :1] * 0 + 1.0)]
    steered = model.generate(*args, max_new_tokens=6, eos_token_id=None, fwd_hooks=steer)
    assert not torch.equal(greedy, steered)
