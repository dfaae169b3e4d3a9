"""LayerNorm's fast path (no hook on its intermediates) against torch's, and its hooks: a
cached or edited intermediate takes the explicit path and flows on."""

from __future__ import annotations

import torch
from torch import nn

from mmlens.model.components.norms import LayerNorm


def _norms() -> tuple[LayerNorm, nn.LayerNorm, torch.Tensor]:
    torch.manual_seed(0)
    ours, theirs = LayerNorm(16, 1e-6), nn.LayerNorm(16, eps=1e-6)
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
        ours.w.copy_(theirs.weight)
        ours.b.copy_(theirs.bias)
    return ours, theirs, torch.randn(2, 5, 16)


def test_unhooked_and_cached_layer_norm_are_torchs_bit_for_bit():
    ours, theirs, x = _norms()
    assert torch.equal(ours(x), theirs(x))
    seen = {}
    ours.hook_scale.add_hook(lambda scale, hook: seen.setdefault("scale", scale))
    assert torch.equal(ours(x), theirs(x))
    assert torch.allclose(seen["scale"], (x.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt())


def test_an_edit_of_the_normalised_input_flows_on():
    ours, theirs, x = _norms()
    ours.hook_normalized.add_hook(lambda normalized, hook: 2 * normalized)
    expected = 2 * (theirs(x) - theirs.bias) + theirs.bias
    assert torch.allclose(ours(x), expected, atol=1e-5)


def test_a_backward_hook_on_the_scale_is_called():
    ours, _, x = _norms()
    grads = []
    ours.hook_scale.add_hook(lambda grad, hook: grads.append(grad), dir="bwd")
    ours(x.requires_grad_()).sum().backward()
    assert len(grads) == 1 and grads[0].shape == (2, 5, 1)
