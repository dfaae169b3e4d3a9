"""The logit lens and activation patching on LLaVA-OneVision (anyres-max pixels and
image_sizes carried by the batch)."""

import dataclasses

import pytest
import torch
from tiny_onevision import QUESTIONS, random_image, tiny_onevision, tiny_processor

from mmlens import HookedMultimodalTransformer
from mmlens.methods.lens import decode, lens_names, residual_stack
from mmlens.methods.patching import logit_diff_metric, patch_activation, patch_spans


@pytest.fixture(scope="module")
def setup():
    hf = tiny_onevision()
    model = HookedMultimodalTransformer.from_hf_model(hf, processor=tiny_processor(hf.config))
    images = [random_image(64, 64, seed=0), random_image(64, 64, seed=5)]
    clean = model.prepare(images, QUESTIONS[:2])
    corrupted = dataclasses.replace(clean, pixel_values=torch.randn_like(clean.pixel_values))
    return model, clean, corrupted


def test_logit_lens_last_layer_is_the_output(setup):
    model, clean, _ = setup
    with torch.no_grad():
        logits, cache = model.run_with_cache(clean, names_filter=lens_names(model))
    every = list(range(clean.input_ids.shape[1]))
    stack, index = residual_stack(cache, layers=[model.cfg.n_layers - 1], positions=every)
    expected = logits[torch.tensor(index["example"]), torch.tensor(index["position"])]
    assert torch.allclose(decode(model, stack[0]), expected, atol=1e-5)


def test_patching_restores_clean_and_image_span_carries_the_image(setup):
    model, clean, corrupted = setup
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(clean)
        corrupted_logits = model(corrupted)
        patched = model.run_with_hooks(corrupted, fwd_hooks=patch_activation(
            "blocks.0.hook_resid_pre", cache["blocks.0.hook_resid_pre"]))
    assert torch.allclose(patched, clean_logits, atol=1e-5)
    assert not torch.allclose(corrupted_logits, clean_logits, atol=1e-3)
    metric = logit_diff_metric(clean_logits[:, -1].argmax(-1).tolist(),
                               corrupted_logits[:, -1].argmin(-1).tolist())
    by_span = patch_spans(model, clean, corrupted, metric, spans=["image", "question"],
                          layers=[0])
    assert by_span[0, 0] == pytest.approx(metric(clean_logits).item(), abs=1e-4)
    assert by_span[0, 1] == pytest.approx(metric(corrupted_logits).item(), abs=1e-4)
