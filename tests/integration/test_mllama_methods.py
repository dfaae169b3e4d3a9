"""Attribution and activation patching on Llama-3.2-Vision (tiny random Mllama, float32):
over prompt positions and per head, cross-attention layers included (their heads are
``cross_attn.hook_z``'s), each against an independent computation: the attribution score is
``(clean - corrupted) . gradient`` with the gradient taken here through a zero added at the
hook; a patch sweep (resumed on the corrupted run's cache, which holds the image keys) equals
one full corrupted forward per cell with the clean activation written in by hand. A span of
image keys, which has no prompt positions, is refused."""

import pytest
import torch
from PIL import Image

from mmlens import HookedMultimodalTransformer
from mmlens.core.errors import MMLensError
from mmlens.methods.attribution import attribution_patching
from mmlens.methods.patching import patch_heads, patch_positions
from mmlens.zoo.tiny import tiny_hf_model, tiny_processor

CROSS = (1, 2)


@pytest.fixture(scope="module")
def run():
    hf = tiny_hf_model("mllama")
    model = HookedMultimodalTransformer.from_hf_model(hf, tiny_processor("mllama", hf.config))
    assert model.cfg.text.cross_attention_layers == CROSS

    def boxed(colour):
        return model.prepare([Image.new("RGB", (37, 29), colour)], ["What color is the square?"],
                             boxes=[[(4, 4, 12, 10)]])

    clean, corrupted = boxed("red"), boxed("blue")
    with torch.no_grad():
        token = int(model(clean)[0, -1].argmax())

    def metric(logits):
        return logits[:, -1].log_softmax(-1)[:, token].mean()

    return model, clean, corrupted, metric


def _name(layer, component):
    module = "cross_attn" if layer in CROSS else "attn"
    return f"blocks.{layer}.{module}.hook_z" if component == "z" else \
        f"blocks.{layer}.hook_{component}"


@pytest.mark.parametrize("component", ["resid_pre", "z"])
def test_attribution_is_the_activation_difference_times_the_gradient(run, component):
    model, clean, corrupted, metric = run
    frame = attribution_patching(model, clean, corrupted, metric, names=component)
    names = [_name(layer, component) for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=lambda n: n in names)
    zeros, seen = {}, {}

    def add_zero(activation, hook):
        seen[hook.name] = activation.detach()
        zeros[hook.name] = torch.zeros_like(activation, requires_grad=True)
        return activation + zeros[hook.name]

    with torch.enable_grad():
        value = metric(model.run_with_hooks(corrupted, fwd_hooks=[(n, add_zero) for n in names]))
        grads = torch.autograd.grad(value, [zeros[n] for n in names])
    for layer, (name, grad) in enumerate(zip(names, grads, strict=True)):
        expected = ((cache[name] - seen[name]) * grad).sum(-1)[0]  # [pos] or [pos, head]
        got = frame[frame["layer"] == layer].sort_values(
            ["pos", "head"] if component == "z" else ["pos"])["score"].to_numpy()
        if component == "z" and layer in CROSS or layer > CROSS[0]:  # the image reached it
            assert float(expected.abs().max()) > 0, name
        assert torch.tensor(got) == pytest.approx(expected.reshape(-1), abs=1e-7), name


def _patched(model, corrupted, metric, name, source, position=None, head=None):
    def write(activation, hook):
        activation = activation.clone()
        at = slice(None) if position is None else position
        if head is None:
            activation[:, at] = source[:, at]
        else:
            activation[:, at, head] = source[:, at, head]
        return activation

    with torch.no_grad():
        return float(metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, write)])))


def test_patching_every_position_equals_a_hand_written_patch(run):
    """Position 0 included: the sweep resumes from the first position, on an empty cache that
    keeps the image keys."""
    model, clean, corrupted, metric = run
    scores = patch_positions(model, clean, corrupted, metric, layers=[0, 2, 3])
    names = [_name(layer, "resid_pre") for layer in (0, 2, 3)]
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n in names)
    for row, name in enumerate(names):
        for position in (0, 3, clean.input_ids.shape[1] - 1):
            expected = _patched(model, corrupted, metric, name, cache[name], position)
            assert float(scores[row, position]) == pytest.approx(expected, abs=1e-5)


def test_patching_heads_of_a_cross_attention_layer_equals_a_hand_written_patch(run):
    model, clean, corrupted, metric = run
    scores = patch_heads(model, clean, corrupted, metric, layers=[1, 3])
    for row, layer in enumerate((1, 3)):
        name = _name(layer, "z")
        _, cache = model.run_with_cache(clean, names_filter=name.__eq__)
        for head in range(model.cfg.n_heads):
            expected = _patched(model, corrupted, metric, name, cache[name], head=head)
            assert float(scores[row, head]) == pytest.approx(expected, abs=1e-5)
    with torch.no_grad():
        baseline = float(metric(model(corrupted)))
    assert float((scores[0] - baseline).abs().max()) > 1e-4  # the cross heads carry the image


def test_a_span_of_image_keys_is_refused_where_positions_are_required(run):
    model, clean, corrupted, metric = run
    with pytest.raises(MMLensError, match="cross-attention keys"):
        patch_positions(model, clean, corrupted, metric, positions="related")
    with pytest.raises(MMLensError, match="cross-attention keys"):
        patch_heads(model, clean, corrupted, metric, positions="other")
