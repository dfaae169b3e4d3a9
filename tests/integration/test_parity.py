"""Numerical parity with Hugging Face's own LlavaForConditionalGeneration on tiny random configs."""

import pytest
import torch
from tiny import hf_image_features, tiny_inputs, tiny_llava

from mmlens import HookedMultimodalTransformer

CONFIGS = {
    "gqa-penultimate": dict(n_kv_heads=2, feature_layer=-2),
    "mha-last-layer": dict(n_kv_heads=4, feature_layer=-1),
    "full-strategy": dict(n_kv_heads=2, feature_layer=-2, strategy="full"),
    "layer-list": dict(n_kv_heads=1, feature_layer=[-3, -1]),
    "first-layer": dict(n_kv_heads=2, feature_layer=1, image_size=48),
    "llama3-rope": dict(n_kv_heads=2, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
}


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


@pytest.mark.parametrize("name", list(CONFIGS))
def test_float32_parity(name):
    hf = tiny_llava(**CONFIGS[name])
    inputs = tiny_inputs(hf.config, batch=2, pad=[0, 3])
    diffs = _compare(hf, inputs, 1e-4)
    assert diffs["logits"] <= 1e-4, diffs
    assert diffs["softmax"] <= 1e-5, diffs
    assert diffs["fast_vs_cached"] <= 1e-5, diffs
    assert diffs["image_features"] <= 1e-5, diffs
    assert all(v <= 1e-5 for k, v in diffs.items() if k.startswith("resid_pre")), diffs


def test_bfloat16_parity():
    hf = tiny_llava(dtype=torch.bfloat16)
    inputs = tiny_inputs(hf.config, batch=2, pad=[0, 2])
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    diffs = _compare(hf, inputs, 5e-2)
    assert diffs["logits"] <= 5e-2, diffs
    assert diffs["softmax"] <= 1e-2, diffs


def test_padded_batch_equals_each_example_alone():
    hf = tiny_llava()
    model = HookedMultimodalTransformer.from_hf_model(hf)
    inputs = tiny_inputs(hf.config, batch=2, pad=[0, 4])
    with torch.no_grad():
        batched = model(inputs["input_ids"], inputs["pixel_values"],
                        attention_mask=inputs["attention_mask"])
        for row in range(2):
            keep = inputs["attention_mask"][row].bool()
            alone = model(inputs["input_ids"][row:row + 1, keep],
                          inputs["pixel_values"][row:row + 1])
            assert (alone[0] - batched[row, keep]).abs().max() <= 1e-5


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


def test_generate_matches_hf_greedy():
    hf = tiny_llava()
    model = HookedMultimodalTransformer.from_hf_model(hf)
    inputs = tiny_inputs(hf.config, batch=2, pad=[0, 3])
    ref = hf.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0,
                      eos_token_id=None)
    ours = model.generate(inputs["input_ids"], inputs["pixel_values"],
                          attention_mask=inputs["attention_mask"], max_new_tokens=8,
                          eos_token_id=None)
    assert torch.equal(ref, ours)
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
