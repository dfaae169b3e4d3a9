"""TransformerLens's surface on the hooked model: per-head hook points in the model's mode
(TL's own patching runs on them), ``tokens_to_residual_directions`` on a string, id or tensor,
the ``cfg`` fields TL code reads, and mean ablation with a mean per position."""

import dataclasses

import pytest
import torch
from conftest_interventions import tiny_batch, tiny_pair
from transformer_lens import patching as tl_patching

from mmlens import HookedMultimodalTransformer
from mmlens.methods import ablate_positions
from mmlens.methods.patching import logit_diff_metric, patch_heads


@pytest.fixture(scope="module")
def pair():
    hf, model = tiny_pair(image_size=16, text_layers=2, vision_layers=2)
    return hf, model


def test_tl_head_patching_by_position_runs_after_set_use_attn_result(pair):
    hf, model = pair
    clean = tiny_batch(hf.config, seed=1, prefix=2, suffix=3)
    corrupted = dataclasses.replace(clean, pixel_values=torch.randn_like(clean.pixel_values))
    model.set_use_attn_result(True)
    try:
        assert not any(module.training for module in model.modules())
        with torch.no_grad():
            clean_logits, cache = model.run_with_cache(clean)
        metric = logit_diff_metric([int(clean_logits[0, -1].argmax())],
                                   [int(clean_logits[0, -1].argmin())])
        # TL refuses to patch while any submodule is in training mode; no model.eval() here
        with model.bind_images(corrupted.pixel_values), torch.no_grad():
            theirs = tl_patching.get_act_patch_attn_head_out_by_pos(
                model, corrupted.input_ids, cache, metric)
    finally:
        model.set_use_attn_result(False)
    ours = patch_heads(model, clean, corrupted, metric, by_position=True)
    assert theirs.shape == ours.shape == (2, clean.input_ids.shape[1], model.cfg.n_heads)
    assert torch.allclose(theirs.cpu(), ours, atol=1e-5)
    assert ours.std() > 1e-4


def test_new_hook_points_follow_train_mode_too(pair):
    _, model = pair
    model.train()
    try:
        model.set_use_attn_result(True)
        assert all(block.attn.hook_result.training for block in model.blocks)
    finally:
        model.set_use_attn_result(False)
        model.eval()


def test_tokens_to_residual_directions_takes_a_string_an_id_or_a_tensor():
    model = HookedMultimodalTransformer.from_pretrained("shapes-llava")
    red = model.to_single_token("Red")
    by_string = model.tokens_to_residual_directions("Red")
    assert by_string.shape == (model.cfg.d_model,)
    assert torch.equal(by_string, model.tokens_to_residual_directions(red))
    assert torch.equal(by_string, model.tokens_to_residual_directions(torch.tensor(red)))
    assert model.tokens_to_residual_directions(torch.tensor([[red, 3]])).shape == (
        1, 2, model.cfg.d_model)
    # the folded direction reads the logit off the normalised residual
    resid = torch.randn(2, model.cfg.d_model)
    with torch.no_grad():
        logits = model.unembed(model.ln_final(resid[:, None]))[:, 0, red]
        scale = (resid.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
        torch.testing.assert_close((resid / scale) @ by_string, logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not one"):
        model.tokens_to_residual_directions("Red square")


def test_cfg_fields_tl_reads():
    model = HookedMultimodalTransformer.from_pretrained("shapes-llava")
    cfg = model.cfg
    assert cfg.model_name == "shapes-llava"
    assert cfg.n_ctx == cfg.hf_config.text_config.max_position_embeddings == 256
    assert cfg.dtype == torch.float32 and cfg.device == torch.device("cpu")
    model.to(torch.bfloat16)
    assert cfg.dtype == torch.bfloat16 == model.W_E.dtype
    hf, _ = tiny_pair(text_layers=1, vision_layers=1)
    tiny = HookedMultimodalTransformer.from_hf_model(hf)
    assert tiny.cfg.n_ctx == hf.config.text_config.max_position_embeddings
    assert tiny.cfg.device == tiny.W_E.device and tiny.cfg.model_name == "llava"


def test_mean_ablation_with_a_mean_per_position(pair):
    hf, model = pair
    batch = tiny_batch(hf.config, batch=2, seed=3)
    name = "blocks.1.hook_resid_pre"
    with torch.no_grad():
        _, cache = model.run_with_cache(batch)
    per_position = cache[name].mean(0)  # [pos, d_model]
    question = [int(p) for p in batch.positions("question", 0)]
    per_ablated = torch.randn(len(question), model.cfg.d_model)
    for means, expected in (({name: per_position}, per_position[question]),
                            ({name: per_ablated}, per_ablated)):
        seen = []
        hooks = ablate_positions(name, question, means=means)
        with torch.no_grad():
            model.run_with_hooks(batch, fwd_hooks=[*hooks, (name, lambda x, hook, seen=seen:
                                                             seen.append(x))])
        for i in range(len(batch)):
            assert torch.equal(seen[0][i, question], expected)
            torch.testing.assert_close(seen[0][i, :question[0]], cache[name][i, :question[0]],
                                       atol=1e-6, rtol=1e-6)
    wrong = {name: torch.randn(len(question) + 1, 3)}
    with pytest.raises(ValueError, match=r"means has shape \[.*\]; give \[48\].*per ablated"):
        model.run_with_hooks(batch, fwd_hooks=ablate_positions(name, question, means=wrong))
