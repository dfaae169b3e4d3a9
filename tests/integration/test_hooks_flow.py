"""Every hook point is on the data path: what a hook returns flows on."""

import pytest
import torch
from tiny import tiny_inputs, tiny_llava

from mmlens import HookedMultimodalTransformer


@pytest.fixture(scope="module")
def setup():
    hf = tiny_llava()
    model = HookedMultimodalTransformer.from_hf_model(hf)
    inputs = tiny_inputs(hf.config)
    with torch.no_grad():
        clean = model(inputs["input_ids"], inputs["pixel_values"])
    return model, inputs, clean


def _perturb(tensor, hook):
    if tensor.dtype == torch.bool:  # a mask: block the first key for every query but the first
        edited = tensor.clone()
        edited[..., 1:, 0] = False
        return edited
    return tensor * 1.5 + 0.05


def test_every_hook_point_changes_the_logits(setup):
    model, inputs, clean = setup
    unchanged = []
    for name in model.hook_dict:
        with torch.no_grad():
            out = model.run_with_hooks(inputs["input_ids"], inputs["pixel_values"],
                                       fwd_hooks=[(name, _perturb)])
        if (out - clean).abs().max() < 1e-6:
            unchanged.append(name)
    assert unchanged == []


def test_zeroing_a_vision_layer_changes_the_logits(setup):
    model, inputs, clean = setup
    with torch.no_grad():
        out = model.run_with_hooks(
            inputs["input_ids"], inputs["pixel_values"],
            fwd_hooks=[("vision.blocks.0.hook_resid_post", lambda x, hook: torch.zeros_like(x))])
    assert (out - clean).abs().max() > 1e-3


def test_editing_a_vision_attention_pattern_changes_the_logits(setup):
    model, inputs, clean = setup

    def uniform(pattern, hook):
        return torch.full_like(pattern, 1.0 / pattern.shape[-1])

    with torch.no_grad():
        out = model.run_with_hooks(inputs["input_ids"], inputs["pixel_values"],
                                   fwd_hooks=[("vision.blocks.1.attn.hook_pattern", uniform)])
    assert (out - clean).abs().max() > 1e-4


def test_identity_hooks_everywhere_change_nothing(setup):
    model, inputs, clean = setup
    with torch.no_grad():
        out = model.run_with_hooks(inputs["input_ids"], inputs["pixel_values"],
                                   fwd_hooks=[(lambda name: True, lambda x, hook: x)])
    assert (out - clean).abs().max() <= 1e-5
