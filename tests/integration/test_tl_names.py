"""TransformerLens names with TransformerLens's meaning: per-head results sum to the attention
output, weight stacks reproduce the hooked activations, the full residual decomposition adds
up, the loss equals Hugging Face's, gradients reach the vision tower."""

import pytest
import torch
from conftest_interventions import tiny_batch
from tiny import tiny_llava_config
from transformer_lens import FactoredMatrix
from transformers import LlavaForConditionalGeneration

from mmlens import HookedMultimodalTransformer

TOL = dict(atol=1e-5, rtol=1e-5)


def biased_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    """A tiny LLaVA whose Llama has attention and MLP biases (so accumulated_bias is not 0)."""
    config = tiny_llava_config(n_kv_heads=2)
    config.text_config.attention_bias = True
    config.text_config.mlp_bias = True
    torch.manual_seed(seed)
    hf = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    hf.set_attn_implementation("eager")
    return hf.eval()


@pytest.fixture(scope="module")
def setup():
    hf = biased_llava()
    model = HookedMultimodalTransformer.from_hf_model(hf)
    batch = tiny_batch(hf.config, batch=2, pad=[0, 2], seed=3)
    return hf, model, batch


def test_hook_result_sums_over_heads_plus_b_O_to_attn_out(setup):
    _, model, batch = setup
    assert not any("hook_result" in name for name in model.hook_dict)
    with torch.no_grad():
        logits_before = model(batch)
        model.set_use_attn_result(True)
        try:
            logits, cache = model.run_with_cache(batch)
        finally:
            model.set_use_attn_result(False)
    assert not any("hook_result" in name for name in model.hook_dict)
    torch.testing.assert_close(logits, logits_before, **TOL)
    n, pos = batch.input_ids.shape
    for prefix, blocks in (("", model.blocks), ("vision.", model.vision.blocks)):
        for layer, block in enumerate(blocks):
            result = cache[f"{prefix}blocks.{layer}.attn.hook_result"]
            assert result.shape[-2:] == (block.attn.n_heads, block.attn.o_weight.shape[0])
            assert block.attn.b_O.abs().max() > 0
            torch.testing.assert_close(result.sum(-2) + block.attn.b_O,
                                       cache[f"{prefix}blocks.{layer}.hook_attn_out"], **TOL)
    assert cache["result", 0].shape == (n, pos, model.cfg.n_heads, model.cfg.d_model)
    # TransformerLens's own helper reads the cached results.
    heads = cache.stack_head_results(layer=model.cfg.n_layers)
    assert heads.shape == (model.cfg.n_layers * model.cfg.n_heads, n, pos, model.cfg.d_model)


def test_weight_stacks_reproduce_the_hooked_activations(setup):
    _, model, batch = setup
    with torch.no_grad():
        _, cache = model.run_with_cache(batch)
    n_heads, n_kv = model.cfg.n_heads, model.cfg.n_key_value_heads
    assert model.W_Q.shape == (model.cfg.n_layers, n_heads, model.cfg.d_model, model.cfg.d_head)
    assert model.W_K.shape == model.W_V.shape == model.W_Q.shape
    assert model.W_O.shape == (model.cfg.n_layers, n_heads, model.cfg.d_head, model.cfg.d_model)
    assert model.W_in.shape == (model.cfg.n_layers, model.cfg.d_model, model.cfg.d_mlp)
    assert model.W_out.shape == (model.cfg.n_layers, model.cfg.d_mlp, model.cfg.d_model)
    torch.testing.assert_close(cache["hook_token_embed"], model.W_E[batch.input_ids])
    for layer, block in enumerate(model.blocks):
        # hook_normalized is before the (unfolded) norm weight w.
        x = cache[f"blocks.{layer}.ln1.hook_normalized"] * block.ln1.w
        b_q, b_k, b_v = (getattr(block.attn, f"{p}_bias").view(-1, model.cfg.d_head)
                         for p in "qkv")
        for head in range(n_heads):
            kv = head // (n_heads // n_kv)
            torch.testing.assert_close(x @ model.W_Q[layer, head] + b_q[head],
                                       cache[f"blocks.{layer}.attn.hook_q"][:, :, head], **TOL)
            torch.testing.assert_close(x @ model.W_K[layer, head] + b_k[kv],
                                       cache[f"blocks.{layer}.attn.hook_k"][:, :, kv], **TOL)
            v = cache[f"blocks.{layer}.attn.hook_v"][:, :, kv]
            # OV maps the residual to what head `head` writes per unit of attention.
            torch.testing.assert_close(x @ model.OV.AB[layer, head] + b_v[kv] @ model.W_O[
                layer, head], v @ model.W_O[layer, head], **TOL)
            torch.testing.assert_close(model.QK.AB[layer, head],
                                       model.W_Q[layer, head] @ model.W_K[layer, head].T, **TOL)
        x2 = cache[f"blocks.{layer}.ln2.hook_normalized"] * block.ln2.w
        torch.testing.assert_close(x2 @ model.W_in[layer] + block.mlp.in_bias,
                                   cache[f"blocks.{layer}.mlp.hook_pre_linear"], **TOL)
        torch.testing.assert_close(cache[f"blocks.{layer}.mlp.hook_post"] @ model.W_out[layer]
                                   + model.b_out[layer],
                                   cache[f"blocks.{layer}.hook_mlp_out"], **TOL)
    assert isinstance(model.QK, FactoredMatrix) and isinstance(model.OV, FactoredMatrix)


def test_accumulated_bias_and_the_full_decomposition_add_up(setup):
    hf, model, batch = setup
    layers = hf.model.language_model.layers
    expected = sum(layers[i].self_attn.o_proj.bias + layers[i].mlp.down_proj.bias
                   for i in range(2)) + layers[2].self_attn.o_proj.bias
    torch.testing.assert_close(model.accumulated_bias(2, mlp_input=True), expected, **TOL)
    torch.testing.assert_close(model.accumulated_bias(0), torch.zeros(model.cfg.d_model))
    with pytest.raises(ValueError, match="outside 0..3"):
        model.accumulated_bias(4)
    with torch.no_grad():
        _, cache = model.run_with_cache(batch)
    n = model.cfg.n_layers
    for layer, mlp_input, target in ((n, False, f"blocks.{n - 1}.hook_resid_post"),
                                     (1, True, "blocks.1.hook_resid_mid")):
        for expand in (True, False):
            parts, labels = cache.get_full_resid_decomposition(
                layer, mlp_input=mlp_input, expand_neurons=expand, return_labels=True)
            assert labels[-2:] == ["embed", "bias"]
            torch.testing.assert_close(parts.sum(0), cache[target], atol=1e-4, rtol=1e-4)


def hf_labels(batch, image_token: int) -> torch.Tensor:
    """Labels for HF's loss: -100 on image tokens, padding, and the first real token."""
    labels = batch.input_ids.clone()
    mask = batch.attention_mask.bool()
    previous_real = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], dim=1)
    labels[(labels == image_token) | ~mask | ~previous_real] = -100
    return labels


def test_loss_equals_hugging_face_and_gradients_reach_the_vision_tower(setup):
    hf, model, batch = setup
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    pixels_hf = batch.pixel_values.clone().requires_grad_(True)
    ref = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
             pixel_values=pixels_hf, position_ids=positions,
             labels=hf_labels(batch, hf.config.image_token_id))
    ref.loss.backward()
    pixels = batch.pixel_values.clone().requires_grad_(True)
    loss = model(batch.input_ids, pixels, attention_mask=batch.attention_mask,
                 return_type="loss")
    loss.backward()
    torch.testing.assert_close(loss, ref.loss, atol=1e-5, rtol=1e-5)
    assert pixels.grad.abs().max() > 0
    torch.testing.assert_close(pixels.grad, pixels_hf.grad, atol=1e-6, rtol=1e-4)

    with torch.no_grad():
        logits, both_loss = model(batch, return_type="both")
        per_token = model(batch, return_type="loss", loss_per_token=True)
    torch.testing.assert_close(logits, model(batch).detach())
    assert per_token.shape == (len(batch), batch.input_ids.shape[1] - 1)
    counted = (hf_labels(batch, hf.config.image_token_id)[:, 1:] != -100)
    assert (per_token[~counted] == 0).all()
    torch.testing.assert_close(per_token[counted].mean(), both_loss)

    # TransformerLens's backward cache needs a scalar output: the loss.
    _, cache = model.run_with_cache(batch, return_type="loss", incl_bwd=True)
    grad = cache["vision.blocks.0.hook_resid_pre_grad"]
    assert grad.shape == cache["vision.blocks.0.hook_resid_pre"].shape and grad.abs().max() > 0


def test_loss_needs_tokens_when_resuming(setup):
    _, model, batch = setup
    with torch.no_grad():
        _, cache = model.run_with_cache(batch)
        resid = cache["blocks.1.hook_resid_pre"]
        with pytest.raises(ValueError, match="needs tokens="):
            model(resid, start_at_layer=1, return_type="loss")
        resumed = model(resid, start_at_layer=1, return_type="loss", tokens=batch.input_ids,
                        attention_mask=batch.attention_mask)
        torch.testing.assert_close(resumed, model(batch, return_type="loss"), **TOL)
    with pytest.raises(ValueError, match="'loss', 'both' or None"):
        model(batch, return_type="probs")
