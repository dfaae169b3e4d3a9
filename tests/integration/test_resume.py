"""start_at_layer / stop_at_layer and resuming from a key/value cache reproduce the full run."""

import torch
from tiny import tiny_inputs, tiny_llava

from mmlens import HookedMultimodalTransformer, KeyValueCache


def test_stop_at_layer_returns_the_residual_entering_that_layer():
    hf = tiny_llava()
    model = HookedMultimodalTransformer.from_hf_model(hf)
    inputs = tiny_inputs(hf.config)
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs["input_ids"], inputs["pixel_values"])
        resid = model(inputs["input_ids"], inputs["pixel_values"], stop_at_layer=2)
    torch.testing.assert_close(resid, cache["blocks.2.hook_resid_pre"])


def test_resume_suffix_from_layer_with_frozen_prefix_cache():
    hf = tiny_llava()
    model = HookedMultimodalTransformer.from_hf_model(hf)
    inputs = tiny_inputs(hf.config)
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    split = ids.shape[1] - 4
    with torch.no_grad():
        full, clean = model.run_with_cache(ids, pixels)
        kv = KeyValueCache.empty(model.cfg.n_layers)
        model(ids, pixels, past_kv_cache=kv)
        for start in range(model.cfg.n_layers):
            frozen = kv.truncate(split).expand(3)
            suffix = clean[f"blocks.{start}.hook_resid_pre"][:, split:].expand(3, -1, -1)
            out = model(suffix, start_at_layer=start, past_kv_cache=frozen)
            assert frozen.length == split  # a frozen cache is never extended
            torch.testing.assert_close(out, full[:, split:].expand(3, -1, -1),
                                       atol=1e-5, rtol=1e-5)


def test_growing_cache_matches_one_pass():
    hf = tiny_llava()
    model = HookedMultimodalTransformer.from_hf_model(hf)
    inputs = tiny_inputs(hf.config, batch=2, pad=[0, 2])
    ids, pixels, mask = inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]
    with torch.no_grad():
        full = model(ids, pixels, attention_mask=mask)
        kv = KeyValueCache.empty(model.cfg.n_layers)
        first = model(ids[:, :-3], pixels, attention_mask=mask[:, :-3], past_kv_cache=kv)
        rest = model(ids[:, -3:], attention_mask=mask[:, -3:], past_kv_cache=kv)
    real = mask.bool()
    torch.testing.assert_close(torch.cat([first, rest], 1)[real], full[real], atol=1e-5,
                               rtol=1e-5)
