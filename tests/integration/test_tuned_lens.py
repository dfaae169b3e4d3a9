"""Tuned lens: identity translators are the logit lens exactly; training lowers the held-out
KL to the final layer below the logit lens's; save/load is exact; bad files are refused; the
emergence study's ``tuned`` reading."""

import json

import pandas as pd
import pytest
import torch
from conftest_interventions import tiny_batch, tiny_pair
from safetensors.torch import save_file

from mmlens.core.errors import MMLensError
from mmlens.experiments.emergence import lens_record
from mmlens.methods.clean_run import clean_run, single_example
from mmlens.methods.lens import lens_names, token_probabilities, top_tokens
from mmlens.methods.tuned_lens import (
    TunedLens,
    lens_activations,
    lens_kl,
    load_tuned_lens,
    train_tuned_lens,
)


@pytest.fixture(scope="module")
def setup():
    hf, model = tiny_pair(image_size=16)
    train = [tiny_batch(hf.config, batch=4, seed=seed) for seed in range(10, 16)]
    held_out = [tiny_batch(hf.config, batch=4, seed=seed) for seed in range(40, 42)]
    lens = train_tuned_lens(model, train, steps=150, lr=3e-3)
    return model, hf, lens, held_out


def test_identity_translators_are_the_logit_lens(setup):
    model, hf, _, held_out = setup
    batch = held_out[0]
    _, cache = model.run_with_cache(batch, names_filter=lens_names(model))
    identity = TunedLens(model.cfg.n_layers, model.cfg.d_model)
    layers = [-1, *range(model.cfg.n_layers)]
    for read in (lambda **kw: token_probabilities(model, cache, [1, 2, 3], layers=layers, **kw),
                 lambda **kw: top_tokens(model, cache, k=3, layers=layers, **kw)):
        pd.testing.assert_frame_equal(read(tuned=identity), read(), check_exact=True)


def test_training_lowers_the_held_out_kl(setup):
    model, _, lens, held_out = setup
    resid, target = lens_activations(model, held_out)
    logit_kl, tuned_kl = lens_kl(model, None, resid, target), lens_kl(model, lens, resid, target)
    print("held-out KL per layer, logit lens", logit_kl.tolist(), "tuned", tuned_kl.tolist())
    assert logit_kl[-1] < 1e-6  # the last layer through the final norm is the output
    assert tuned_kl[:-1].mean() < 0.7 * logit_kl[:-1].mean()
    assert (tuned_kl[:-1] < logit_kl[:-1]).all()
    assert lens.metadata["training"]["steps"] == 150


def test_save_load_round_trip_is_exact(setup, tmp_path):
    model, _, lens, _ = setup
    loaded = load_tuned_lens(lens.save(tmp_path / "lens"), model)
    assert torch.equal(loaded.weight, lens.weight) and torch.equal(loaded.bias, lens.bias)
    assert loaded.metadata == json.loads(json.dumps(lens.metadata))


def corrupt(folder, what):
    if what == "json":
        (folder / "tuned_lens.json").write_text("{not json")
    elif what in ("n_layers", "model"):
        meta = json.loads((folder / "tuned_lens.json").read_text())
        meta[what] = 99 if what == "n_layers" else "another-model"
        (folder / "tuned_lens.json").write_text(json.dumps(meta))
    elif what == "shape":
        save_file({"weight": torch.zeros(2, 3, 3), "bias": torch.zeros(2, 3)},
                  str(folder / "tuned_lens.safetensors"))
    elif what == "nan":
        tensors = {"weight": torch.zeros(4, 48, 48), "bias": torch.full((4, 48), float("nan"))}
        save_file(tensors, str(folder / "tuned_lens.safetensors"))
    elif what == "pickle":
        (folder / "tuned_lens.safetensors").write_bytes(b"\x80\x04not safetensors")
    elif what == "missing":
        (folder / "tuned_lens.json").unlink()


@pytest.mark.parametrize("what,message", [
    ("json", "not valid JSON"),
    ("n_layers", "was trained for"),
    ("model", "was trained for"),
    ("shape", "needs weight"),
    ("nan", "NaN or infinite"),
    ("pickle", "cannot read"),
    ("missing", "is not a saved tuned lens"),
])
def test_bad_files_are_refused(setup, tmp_path, what, message):
    model, _, lens, _ = setup
    folder = lens.save(tmp_path / "lens")
    corrupt(folder, what)
    with pytest.raises(MMLensError, match=message):
        load_tuned_lens(folder, model)


def test_bad_settings_and_layers_are_refused(setup):
    model, _, lens, held_out = setup
    with pytest.raises(MMLensError, match="steps and items_per_step"):
        train_tuned_lens(model, held_out, steps=0)
    with pytest.raises(MMLensError, match="no batches"):
        train_tuned_lens(model, [])
    with pytest.raises(MMLensError, match="has no translator"):
        lens.translate(torch.zeros(2, model.cfg.d_model), model.cfg.n_layers)


def test_emergence_gains_a_tuned_reading(setup):
    model, _, lens, held_out = setup
    clean = clean_run(model, single_example(held_out[0], 0))
    variants = {"a": 5, "b": 7}
    identity = lens_record(model, clean, variants,
                           TunedLens(model.cfg.n_layers, model.cfg.d_model))["readings"]
    assert identity["tuned"] == identity["final_norm"]
    tuned = lens_record(model, clean, variants, lens)["readings"]
    assert tuned["tuned"]["prob"] != tuned["final_norm"]["prob"]
    assert "tuned" not in lens_record(model, clean, variants)["readings"]
