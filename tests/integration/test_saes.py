"""Sparse autoencoders in SAELens's format: encode/decode against an independent numpy
computation per architecture, spliced into language and vision hooks (outputs unchanged with
the error term, SAELens's hook names in the cache, a feature ablation equal to editing the
activation by hand), and bad files refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest_interventions import tiny_batch, tiny_pair
from safetensors.torch import save_file

from mmlens.core.errors import MMLensError, MMLensFileNotFoundError
from mmlens.methods.saes import load_sae

LANGUAGE_HOOK = "blocks.1.hook_resid_post"
VISION_HOOK = "vision.blocks.1.hook_resid_post"
NAMES = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons",
         "hook_sae_error", "hook_sae_output")


def random_weights(d_in: int, d_sae: int, seed: int = 0, threshold: bool = False) -> dict:
    gen = torch.Generator().manual_seed(seed)
    weights = {"W_enc": torch.randn(d_in, d_sae, generator=gen) / d_in**0.5,
               "b_enc": torch.randn(d_sae, generator=gen) * 0.1,
               "W_dec": torch.randn(d_sae, d_in, generator=gen) / d_sae**0.5,
               "b_dec": torch.randn(d_in, generator=gen) * 0.1}
    if threshold:
        weights["threshold"] = torch.rand(d_sae, generator=gen) * 0.2
    return weights


def write_sae(folder, weights: dict, hook_name: str, architecture: str = "standard",
              **config) -> object:
    """An SAELens 6 save: cfg.json (hook name under metadata) + sae_weights.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"architecture": architecture, "d_in": weights["W_enc"].shape[0],
           "d_sae": weights["W_enc"].shape[1], "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none", "metadata": {"hook_name": hook_name}, **config}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "sae_weights.safetensors")
    return folder


def numpy_sae(weights: dict, x: np.ndarray, architecture: str, apply_b_dec: bool = True,
              k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    w = {name: t.double().numpy() for name, t in weights.items()}
    pre = (x - w["b_dec"] * apply_b_dec) @ w["W_enc"] + w["b_enc"]
    acts = np.maximum(pre, 0)
    if architecture == "jumprelu":
        acts = acts * (pre > w["threshold"])
    if architecture == "topk":
        keep = np.argsort(-pre, axis=-1)[..., :k]
        mask = np.zeros_like(pre, dtype=bool)
        np.put_along_axis(mask, keep, True, axis=-1)
        acts = np.where(mask, acts, 0.0)
    return acts, acts @ w["W_dec"] + w["b_dec"]


@pytest.fixture(scope="module")
def setup():
    hf, model = tiny_pair()
    return model, tiny_batch(hf.config, batch=2, pad=[0, 2])


@pytest.mark.parametrize("architecture, extra", [
    ("standard", {}), ("standard", {"apply_b_dec_to_input": False}), ("jumprelu", {}),
    ("topk", {"k": 5}), ("standard", {"activation_fn_str": "topk",
                                      "activation_fn_kwargs": {"k": 3}}),
])
def test_encode_decode_match_numpy(tmp_path, architecture, extra):
    weights = random_weights(12, 40, threshold=architecture == "jumprelu")
    sae = load_sae(write_sae(tmp_path / "sae", weights, LANGUAGE_HOOK, architecture, **extra))
    x = torch.randn(3, 7, 12, generator=torch.Generator().manual_seed(1))
    expected_arch = "topk" if "k" in extra or "activation_fn_kwargs" in extra else architecture
    k = extra.get("k", (extra.get("activation_fn_kwargs") or {}).get("k"))
    acts, recons = numpy_sae(weights, x.double().numpy(), expected_arch,
                             extra.get("apply_b_dec_to_input", True), k)
    with torch.no_grad():
        ours = sae.encode(x)
        assert np.abs(ours.double().numpy() - acts).max() <= 1e-5
        assert np.abs(sae.decode(ours).double().numpy() - recons).max() <= 1e-5
    assert sae.architecture == expected_arch and sae.hook_name == LANGUAGE_HOOK
    if expected_arch == "topk":
        assert int((ours != 0).sum(-1).max()) <= k
    assert (acts > 0).any() and (acts == 0).any()  # the activation did something


def test_plain_safetensors_file_with_arguments(tmp_path):
    weights = random_weights(12, 20, threshold=True)
    save_file(weights, tmp_path / "w.safetensors")
    sae = load_sae(tmp_path / "w.safetensors", hook_name=LANGUAGE_HOOK,
                   apply_b_dec_to_input=False)
    assert sae.architecture == "jumprelu" and not sae.apply_b_dec_to_input
    x = torch.randn(4, 12)
    acts, _ = numpy_sae(weights, x.double().numpy(), "jumprelu", apply_b_dec=False)
    with torch.no_grad():
        assert np.abs(sae.encode(x).double().numpy() - acts).max() <= 1e-5


@pytest.mark.parametrize("hook, width", [(LANGUAGE_HOOK, 48), (VISION_HOOK, 32)])
def test_splice_with_error_term_leaves_outputs_and_names_the_hooks(setup, tmp_path, hook, width):
    model, batch = setup
    sae = load_sae(write_sae(tmp_path / "sae", random_weights(width, 64), hook))
    with torch.no_grad():
        clean = model(batch)
        with model.saes([sae], use_error_term=True):
            spliced, cache = model.run_with_cache(batch)
        after = model(batch)
    assert (spliced - clean).abs().max() <= 1e-5
    assert torch.equal(after, clean)
    for name in NAMES:
        assert f"{hook}.{name}" in cache
    assert f"{hook}.hook_sae_input" not in model.hook_dict  # gone after the block
    x = cache[f"{hook}.hook_sae_input"]
    acts, recons = numpy_sae({k: v.detach() for k, v in sae.state_dict().items()},
                             x.double().numpy(), "standard")
    assert np.abs(cache[f"{hook}.hook_sae_acts_post"].double().numpy() - acts).max() <= 1e-5
    error = cache[f"{hook}.hook_sae_error"].double().numpy()
    assert np.abs(error - (x.double().numpy() - recons)).max() <= 1e-5


@pytest.mark.parametrize("hook, width", [(LANGUAGE_HOOK, 48), (VISION_HOOK, 32)])
def test_without_error_term_the_reconstruction_flows_on(setup, tmp_path, hook, width):
    model, batch = setup
    weights = random_weights(width, 64)
    sae = load_sae(write_sae(tmp_path / "sae", weights, hook))

    def replace(resid, hook):  # the reconstruction, computed independently
        _, recons = numpy_sae(weights, resid.double().numpy(), "standard")
        return torch.tensor(recons, dtype=resid.dtype)

    with torch.no_grad():
        expected = model.run_with_hooks(batch, fwd_hooks=[(hook, replace)])
        with model.saes(sae, use_error_term=False):
            ours = model(batch)
    assert (ours - expected).abs().max() <= 1e-4
    assert (ours - model(batch)).abs().max() > 1e-3


def test_ablating_a_feature_equals_editing_the_activation(setup, tmp_path):
    model, batch = setup
    weights = random_weights(48, 64)
    sae = load_sae(write_sae(tmp_path / "sae", weights, LANGUAGE_HOOK))
    with torch.no_grad(), model.saes([sae]):
        _, cache = model.run_with_cache(batch, names_filter=f"{LANGUAGE_HOOK}.hook_sae_acts_post")
    feature = int(cache[f"{LANGUAGE_HOOK}.hook_sae_acts_post"].sum((0, 1)).argmax())

    def ablate(acts, hook):
        acts = acts.clone()
        acts[..., feature] = 0
        return acts

    def by_hand(resid, hook):  # x - a_f * W_dec[f]: the error term keeps the rest
        acts, _ = numpy_sae(weights, resid.double().numpy(), "standard")
        edit = acts[..., feature:feature + 1] * weights["W_dec"][feature].double().numpy()
        return resid - torch.tensor(edit, dtype=resid.dtype)

    with torch.no_grad():
        expected = model.run_with_hooks(batch, fwd_hooks=[(LANGUAGE_HOOK, by_hand)])
        with model.saes([sae]):
            ours = model.run_with_hooks(
                batch, fwd_hooks=[(f"{LANGUAGE_HOOK}.hook_sae_acts_post", ablate)])
        clean = model(batch)
    real = batch.attention_mask.bool()
    assert (ours - expected)[real].abs().max() <= 1e-4
    assert (ours - clean)[real].abs().max() > 1e-4  # the feature mattered


def test_bad_files_are_refused(setup, tmp_path):
    model, batch = setup
    weights = random_weights(12, 20)
    partial = {k: v for k, v in weights.items() if k != "b_dec"}
    save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(MMLensError, match="has no b_dec"):
        load_sae(tmp_path / "partial.safetensors", hook_name=LANGUAGE_HOOK)
    with pytest.raises(MMLensError, match="unknown SAE architecture 'gated'"):
        load_sae(write_sae(tmp_path / "gated", weights, LANGUAGE_HOOK, "gated"))
    with pytest.raises(MMLensError, match="normalize_activations"):
        load_sae(write_sae(tmp_path / "norm", weights, LANGUAGE_HOOK,
                           normalize_activations="expected_average_only_in"))
    with pytest.raises(MMLensError, match="needs its threshold"):
        load_sae(write_sae(tmp_path / "jump", weights, LANGUAGE_HOOK, "jumprelu"))
    with pytest.raises(MMLensError, match="needs k"):
        load_sae(write_sae(tmp_path / "topk", weights, LANGUAGE_HOOK, "topk"))
    bad_shape = dict(weights, W_dec=torch.randn(20, 11))
    with pytest.raises(MMLensError, match="W_dec has shape"):
        load_sae(write_sae(tmp_path / "shape", bad_shape, LANGUAGE_HOOK))
    with pytest.raises(MMLensError, match="d_in=13"):
        load_sae(write_sae(tmp_path / "cfg", weights, LANGUAGE_HOOK, d_in=13))
    torch.save(weights, tmp_path / "weights.pt")
    with pytest.raises(MMLensError, match="safetensors only"):
        load_sae(tmp_path / "weights.pt", hook_name=LANGUAGE_HOOK)
    with pytest.raises(MMLensFileNotFoundError, match="not an SAELens folder"):
        load_sae(tmp_path)
    narrow = load_sae(write_sae(tmp_path / "narrow", weights, LANGUAGE_HOOK))
    with pytest.raises(MMLensError, match="d_in=12 but the activation at blocks.1"), \
            torch.no_grad(), model.saes([narrow]):
        model(batch)
    assert f"{LANGUAGE_HOOK}.hook_sae_input" not in model.hook_dict
    with model.saes([narrow]), pytest.raises(MMLensError, match="spliced at blocks.1"), \
            model.saes([load_sae(tmp_path / "narrow")]):
        pass
    assert f"{LANGUAGE_HOOK}.hook_sae_input" not in model.hook_dict
    with torch.no_grad():
        model(batch)  # runs: the narrow SAE (which would raise) is off the hook
    with pytest.raises(KeyError, match="unknown hook name"), model.saes(
            [load_sae(tmp_path / "narrow", hook_name="blocks.9.hook_resid_post")]):
        pass
