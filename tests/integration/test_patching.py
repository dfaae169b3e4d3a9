"""Activation patching: full patches restore the clean run, TransformerLens's patching under
bind_images agrees with a hand-written loop and with ours, spans across lengths, errors."""

import dataclasses
import re

import pytest
import torch
from conftest_interventions import tiny_batch, tiny_pair
from transformer_lens import patching as tl_patching
from typecheck import unchecked

from mmlens.methods.patching import (
    answer_prob_metric,
    corrupt_image,
    logit_diff_metric,
    patch_activation,
    patch_heads,
    patch_positions,
    patch_spans,
    patching_frame,
)


@pytest.fixture(scope="module")
def setup():
    hf, model = tiny_pair(image_size=16)  # 4 image tokens: short prompts, quick sweeps
    clean = tiny_batch(hf.config, batch=2, seed=1)
    corrupted = dataclasses.replace(clean, pixel_values=torch.randn_like(clean.pixel_values))
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(clean)
        corrupted_logits = model(corrupted)
    answer = clean_logits[:, -1].argmax(-1).tolist()
    wrong = corrupted_logits[:, -1].argmin(-1).tolist()
    metric = logit_diff_metric(answer, wrong)
    return model, clean, corrupted, cache, metric, clean_logits, corrupted_logits


def test_full_residual_at_layer_0_restores_clean_logits(setup):
    model, clean, corrupted, cache, _, clean_logits, corrupted_logits = setup
    hooks = patch_activation("blocks.0.hook_resid_pre", cache["blocks.0.hook_resid_pre"])
    with torch.no_grad():
        patched = model.run_with_hooks(corrupted, fwd_hooks=hooks)
    assert torch.allclose(patched, clean_logits, atol=1e-5)
    assert not torch.allclose(corrupted_logits, clean_logits, atol=1e-3)


def test_layer_0_differs_only_at_image_positions(setup):
    model, clean, corrupted, _, metric, clean_logits, corrupted_logits = setup
    by_position = patch_positions(model, clean, corrupted, metric, layers=[0])
    assert by_position.shape == (1, clean.input_ids.shape[1])
    image = clean.positions("image", 0)
    text = [p for p in range(clean.input_ids.shape[1]) if p not in image]
    assert torch.allclose(by_position[0, text], metric(corrupted_logits).expand(len(text)),
                          atol=1e-5)
    by_span = patch_spans(model, clean, corrupted, metric, spans=["image", "question"],
                          layers=[0, 1])
    assert by_span.shape == (2, 2)
    assert by_span[0, 0] == pytest.approx(metric(clean_logits).item(), abs=1e-4)
    assert by_span[0, 1] == pytest.approx(metric(corrupted_logits).item(), abs=1e-4)


def _hand_written(model, corrupted_ids, cache, metric, name):
    scores = torch.zeros(model.cfg.n_layers, corrupted_ids.shape[1])
    for layer in range(model.cfg.n_layers):
        for position in range(corrupted_ids.shape[1]):
            def hook(activation, hook, layer=layer, position=position):
                activation = activation.clone()
                activation[:, position] = cache[name.format(layer)][:, position]
                return activation

            with torch.no_grad():
                logits = model.run_with_hooks(corrupted_ids, fwd_hooks=[(name.format(layer), hook)])
            scores[layer, position] = metric(logits)
    return scores


def test_transformer_lens_patching_under_bind_images(setup):
    model, clean, corrupted, cache, metric, _, _ = setup
    with model.bind_images(corrupted.pixel_values), torch.no_grad():
        theirs = tl_patching.get_act_patch_resid_pre(model, corrupted.input_ids, cache, metric)
        loop = _hand_written(model, corrupted.input_ids, cache, metric, "blocks.{}.hook_resid_pre")
        heads = tl_patching.get_act_patch_attn_head_out_all_pos(
            model, corrupted.input_ids, cache, metric)
    ours = patch_positions(model, clean, corrupted, metric, component="resid_pre")
    assert theirs.shape == (model.cfg.n_layers, clean.input_ids.shape[1])
    assert torch.allclose(theirs.cpu(), loop, atol=1e-5)
    assert torch.allclose(ours, loop, atol=1e-5)
    assert loop.std() > 1e-3
    assert torch.allclose(patch_heads(model, clean, corrupted, metric), heads.cpu(), atol=1e-5)


def test_heads_by_position(setup):
    model, clean, corrupted, _, metric, _, _ = setup
    by_position = patch_heads(model, clean, corrupted, metric, layers=[1], positions="question",
                              by_position=True)
    assert by_position.shape == (1, len(clean.positions("question", 0)), model.cfg.n_heads)
    at_last = patch_heads(model, clean, corrupted, metric, layers=[1, 2], positions="last")
    last_by_position = patch_heads(model, clean, corrupted, metric, layers=[1, 2],
                                   positions="last", by_position=True)
    assert torch.allclose(at_last, last_by_position[:, 0])
    assert at_last.std() > 1e-4


def test_prompts_of_different_lengths_patch_by_span(setup):
    model, clean, _, _, _, _, _ = setup
    longer = tiny_batch(model.cfg.hf_config, batch=2, seed=5, prefix=6)
    assert longer.input_ids.shape[1] == clean.input_ids.shape[1] + 3
    with torch.no_grad():
        clean_logits = model(clean)
    metric = answer_prob_metric(clean_logits[:, -1].argmax(-1).tolist())
    last = model.cfg.n_layers - 1
    by_token = patch_positions(model, clean, longer, metric, positions="question",
                               component="resid_post", layers=[0, last])
    assert by_token.shape == (2, len(clean.positions("question", 0)))
    whole = patch_spans(model, clean, longer, metric, spans=["last"], component="resid_post",
                        layers=[last])
    assert whole[0, 0] == pytest.approx(metric(clean_logits).item(), abs=1e-5)
    frame = patching_frame(by_token, ("layer", "token"), labels={"layer": [0, last]})
    assert list(frame.columns) == ["layer", "token", "metric"]
    assert len(frame) == by_token.numel() and set(frame["layer"]) == {0, last}
    with pytest.raises(ValueError, match="patch by span"):
        patch_positions(model, clean, longer, metric)


def test_corrupt_image_and_metrics(setup):
    model, clean, _, _, _, clean_logits, _ = setup
    noised = corrupt_image(clean, noise=0.5, seed=3)
    assert torch.equal(noised.input_ids, clean.input_ids)
    assert (noised.pixel_values - clean.pixel_values).std() == pytest.approx(0.5, rel=0.1)
    probs = clean_logits[:, -1].softmax(-1)
    assert answer_prob_metric([3, 4])(clean_logits) == pytest.approx(
        ((probs[0, 3] + probs[1, 4]) / 2).item())
    assert logit_diff_metric(3, 4)(clean_logits) == pytest.approx(
        (clean_logits[:, -1, 3] - clean_logits[:, -1, 4]).mean().item(), abs=1e-6)


@pytest.mark.parametrize("change, kwargs, error, message", [
    (lambda c: dataclasses.replace(c, pixel_values=None), {}, ValueError,
     "the corrupted batch has no pixel_values"),
    (lambda c: c.select([0]), {}, ValueError, "clean has 2 examples but corrupted has 1"),
    (lambda c: c, {"component": "resid"}, ValueError, "component 'resid' is not patchable"),
    (lambda c: c, {"layers": [0, 3]}, ValueError, "layers [3] are outside the model's layers"),
    (lambda c: c.input_ids, {}, TypeError, "must be a MultimodalBatch"),
    (lambda c: c, {"positions": "questoin"}, KeyError, "Did you mean question"),
])
def test_bad_input(setup, change, kwargs, error, message):
    model, clean, corrupted, _, metric, _, _ = setup
    with pytest.raises(error, match=re.escape(message)), unchecked():
        patch_positions(model, clean, change(corrupted), metric, **kwargs)


def test_spans_of_different_lengths_raise(setup):
    model, clean, _, _, metric, _, _ = setup
    longer = tiny_batch(model.cfg.hf_config, batch=2, seed=5, suffix=8)
    with pytest.raises(ValueError, match="span 'question' of example 0 has 5 positions in the "
                                         "clean prompt but 7 in the corrupted one"):
        patch_spans(model, clean, longer, metric, spans=["question"])
    with pytest.raises(ValueError, match="got 3 answer tokens for a batch of 2"):
        logit_diff_metric([1, 2, 3], 4)(torch.zeros(2, 5, 10))


def test_stacked_resumed_sweeps_equal_one_full_forward_per_cell(setup):
    """The sweep resumes from the corrupted residual stream and stacks cells; each cell must
    equal a full forward of the corrupted batch (image encoded again) with that one patch, on
    left-padded prompts, whatever the number of cells per forward."""
    model, _, _, _, _, _, _ = setup
    clean = tiny_batch(model.cfg.hf_config, batch=2, pad=[0, 2], seed=7)
    corrupted = dataclasses.replace(clean, pixel_values=torch.randn_like(clean.pixel_values))
    assert (clean.attention_mask == 0).any()
    with torch.no_grad():
        answer = model(clean)[:, -1].argmax(-1).tolist()
    shapes = []

    def metric(logits):
        shapes.append(tuple(logits.shape))
        return answer_prob_metric(answer)(logits)

    layers, spans = [1, 2], ["image", "question", "last"]
    _, cache = model.run_with_cache(clean)
    expected = torch.zeros(len(layers), len(spans))
    for row, layer in enumerate(layers):
        name = f"blocks.{layer}.hook_resid_mid"
        for column, span in enumerate(spans):
            pairs = [(t, s) for s, t in zip(clean.span(span), corrupted.span(span), strict=True)]
            with torch.no_grad():
                logits = model.run_with_hooks(
                    corrupted, fwd_hooks=patch_activation(name, cache[name], pairs))
            expected[row, column] = answer_prob_metric(answer)(logits)
    for batch_size in (1, 4, 64):
        shapes.clear()
        got = patch_spans(model, clean, corrupted, metric, spans=spans, component="resid_mid",
                          layers=layers, batch_size=batch_size)
        assert torch.allclose(got, expected, atol=1e-6), batch_size
        assert set(shapes) == {(2, *model(corrupted).shape[1:])}
        assert len(shapes) == len(layers) * len(spans)
    assert expected.std() > 1e-4
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        patch_spans(model, clean, corrupted, metric, spans=spans, batch_size=0)


def test_patching_a_batch_of_another_size_raises(setup):
    model, clean, corrupted, cache, _, _, _ = setup
    one = cache["blocks.1.hook_resid_pre"][:1]
    pairs = [(clean.span("last")[0], clean.span("last")[0])]
    with pytest.raises(ValueError, match="pair every corrupted example with one clean example"):
        model.run_with_hooks(corrupted,
                             fwd_hooks=patch_activation("blocks.1.hook_resid_pre", one, pairs))


def test_sweeps_from_each_cells_first_position_equal_one_forward_per_cell(setup):
    """Cells rerun only the positions from their first patched one on, with the corrupted
    keys/values and logits before it: every position and every head of left-padded prompts
    against a full forward per cell, with a metric that reads every real position's logits
    (padding positions attend to nothing real, and their logits stay the corrupted run's)."""
    model, _, _, _, _, _, _ = setup
    clean = tiny_batch(model.cfg.hf_config, batch=2, pad=[0, 2], seed=9)
    corrupted = dataclasses.replace(clean, pixel_values=torch.randn_like(clean.pixel_values))

    real = corrupted.attention_mask.bool()

    def metric(logits):  # every real position counts, so kept earlier logits must be right
        return logits[real].float().log_softmax(-1)[..., :7].mean()

    layers, name = [0, 2], "blocks.{}.attn.hook_z"
    _, cache = model.run_with_cache(clean)
    n_pos, n_heads = clean.input_ids.shape[1], model.cfg.n_heads
    expected = torch.zeros(len(layers), n_pos, n_heads)
    for row, layer in enumerate(layers):
        hook = name.format(layer)
        for pos in range(n_pos):
            at = torch.tensor([pos])
            for head in range(n_heads):
                with torch.no_grad():
                    logits = model.run_with_hooks(corrupted, fwd_hooks=patch_activation(
                        hook, cache[hook], [(at, at)] * 2, head=head))
                expected[row, pos, head] = metric(logits)
    for batch_size in (2, 10, 256):
        got = patch_heads(model, clean, corrupted, metric, layers=layers, by_position=True,
                          batch_size=batch_size)
        assert (got - expected).abs().max() <= 1e-6, batch_size
    assert expected.std() > 1e-4
