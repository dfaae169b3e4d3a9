"""Attribution patching against autograd on the Hugging Face model: the same (clean -
corrupted) . gradient, taken from HF's own tensors, for every name; the figure; errors."""

import dataclasses

import pytest
import torch
from conftest_interventions import tiny_batch, tiny_pair

from mmlens.methods.patching import attribution_patching, logit_diff_metric
from mmlens.plotting import attribution_figure

NAMES = ["resid_pre", "attn_out", "mlp_out", "z", "vision_resid_pre"]


@pytest.fixture(scope="module")
def setup():
    hf, model = tiny_pair(image_size=16)
    clean = tiny_batch(hf.config, batch=2, pad=[0, 1], seed=5)
    corrupted = dataclasses.replace(clean, pixel_values=torch.randn_like(clean.pixel_values))
    with torch.no_grad():
        answer = model(clean)[:, -1].argmax(-1).tolist()
        wrong = model(corrupted)[:, -1].argmin(-1).tolist()
    return hf, model, clean, corrupted, logit_diff_metric(answer, wrong)


def hf_activations(hf, batch, n_vision: int, grad_of=None):
    """HF's tensors for each name and layer, and (with ``grad_of``) the metric's gradient."""
    text, vision = hf.model.language_model.layers, hf.model.vision_tower.encoder
    kept, handles = {}, []

    def first_input(key):
        def hook(module, args, kwargs):
            kept[key] = args[0] if args else kwargs["hidden_states"]
        return hook

    def output(key, index=None):
        def hook(module, args, out):
            kept[key] = out if index is None else out[index]
        return hook

    def o_proj_input(key):
        def hook(module, args):
            kept[key] = args[0]
        return hook

    for layer, block in enumerate(text):
        handles += [
            block.register_forward_pre_hook(first_input(("resid_pre", layer)), with_kwargs=True),
            block.self_attn.register_forward_hook(output(("attn_out", layer), 0)),
            block.mlp.register_forward_hook(output(("mlp_out", layer))),
            block.self_attn.o_proj.register_forward_pre_hook(o_proj_input(("z", layer))),
        ]
    for layer in range(n_vision):
        handles.append(vision.layers[layer].register_forward_pre_hook(
            first_input(("vision_resid_pre", layer)), with_kwargs=True))
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    try:
        with torch.set_grad_enabled(grad_of is not None):
            logits = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        pixel_values=batch.pixel_values, position_ids=positions).logits
    finally:
        for handle in handles:
            handle.remove()
    if grad_of is None:
        return kept, None
    keys = list(kept)
    grads = torch.autograd.grad(grad_of(logits), [kept[k] for k in keys])
    return kept, dict(zip(keys, grads, strict=True))


def test_scores_equal_autograd_on_the_hf_model(setup):
    hf, model, clean, corrupted, metric = setup
    frame = attribution_patching(model, clean, corrupted, metric, names=NAMES)
    assert list(frame.columns) == ["name", "layer", "pos", "head", "score"]
    n_vision = model.cfg.vision.n_layers
    clean_acts, _ = hf_activations(hf, clean, n_vision)
    corrupted_acts, grads = hf_activations(hf, corrupted, n_vision, grad_of=metric)
    d_head = model.cfg.d_head
    for (name, layer), grad in grads.items():
        delta = clean_acts[name, layer] - corrupted_acts[name, layer]
        if name == "z":
            delta = delta.unflatten(-1, (-1, d_head))
            grad = grad.unflatten(-1, (-1, d_head))
        expected = (delta * grad).sum(-1).sum(0).detach()
        rows = frame[(frame["name"] == name) & (frame["layer"] == layer)]
        got = torch.tensor(rows["score"].tolist())
        torch.testing.assert_close(got, expected.reshape(-1), atol=1e-5, rtol=1e-4,
                                   msg=f"{name} layer {layer}")
        assert len(rows) == expected.numel()
    resid = frame[frame["name"] == "resid_pre"]
    assert resid["score"].abs().max() > 1e-3
    assert resid["head"].isna().all() and frame[frame["name"] == "z"]["head"].notna().all()


def test_denoising_convention_for_a_small_corruption(setup):
    """For a corruption small enough that the first-order estimate is accurate, the scores at
    layer 0 (the residual stream differs only at the image) add up to
    metric(clean) - metric(corrupted): the sign and size of TransformerLens's denoising
    convention."""
    _, model, clean, _, metric = setup
    noise = torch.randn(clean.pixel_values.shape, generator=torch.Generator().manual_seed(0))
    corrupted = dataclasses.replace(clean, pixel_values=clean.pixel_values + 1e-3 * noise)
    frame = attribution_patching(model, clean, corrupted, metric)
    estimate = frame[frame["layer"] == 0]["score"].sum()
    with torch.no_grad():
        actual = float(metric(model(clean)) - metric(model(corrupted)))
    assert abs(actual) > 1e-5
    assert estimate == pytest.approx(actual, rel=0.02)


def test_figure_and_errors(setup):
    _, model, clean, corrupted, metric = setup
    frame = attribution_patching(model, clean, corrupted, metric, names=["resid_pre", "z"])
    figure = attribution_figure(frame)
    assert len(figure.data) == 2
    top = frame[frame["name"] == "resid_pre"].loc[
        frame[frame["name"] == "resid_pre"]["score"].abs().idxmax()]
    assert f"layer {top['layer']}, pos {top['pos']}" in figure.layout.annotations[0].text
    assert list(attribution_patching(model, clean, corrupted, metric).columns) == [
        "name", "layer", "pos", "score"]
    with pytest.raises(ValueError, match="cannot be scored"):
        attribution_patching(model, clean, corrupted, metric, names="resid_post")
    shorter = clean.select([0])
    with pytest.raises(ValueError, match="need the same shape"):
        attribution_patching(model, clean, shorter, metric)
    with pytest.raises(ValueError, match="needs a scalar"):
        attribution_patching(model, clean, corrupted, lambda logits: logits[:, -1, 0])
