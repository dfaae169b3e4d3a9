"""Logit lens: the last layer with the final norm is the model's output; tidy frames; errors."""

import re
from types import SimpleNamespace

import pytest
import torch
from conftest_interventions import tiny_batch, tiny_pair, tiny_tokenizer

from mmlens.methods.lens import (
    answer_tokens,
    decode,
    lens_names,
    residual_stack,
    token_probabilities,
    top_tokens,
)


@pytest.fixture(scope="module")
def setup():
    hf, model = tiny_pair()
    batch = tiny_batch(hf.config, batch=2, pad=[0, 2])
    with torch.no_grad():
        logits, cache = model.run_with_cache(batch, names_filter=lens_names(model))
    return model, batch, logits, cache


def test_last_layer_with_final_norm_is_the_output(setup):
    model, batch, logits, cache = setup
    every = list(range(batch.input_ids.shape[1]))
    stack, index = residual_stack(cache, layers=[model.cfg.n_layers - 1], positions=every)
    decoded = decode(model, stack[0])
    expected = logits[torch.tensor(index["example"]), torch.tensor(index["position"])]
    assert torch.allclose(decoded, expected, atol=1e-5)
    predicted = logits[:, -1].argmax(-1).tolist()
    frame = token_probabilities(model, cache, predicted, layers=[model.cfg.n_layers - 1])
    probs = logits[:, -1].softmax(-1)
    for _, row in frame.iterrows():
        assert row["prob"] == pytest.approx(probs[row["example"], row["token_id"]].item(), abs=1e-6)
        assert (row["rank"] == 1) == (row["token_id"] == predicted[row["example"]])


def test_without_final_norm_is_the_plain_unembedding(setup):
    model, batch, _, cache = setup
    frame = token_probabilities(model, cache, [5, 7], batch=batch, apply_ln=False,
                                layers=["embed", 1])
    assert sorted(frame["layer"].unique()) == [-1, 1]
    for layer, name in ((-1, "hook_embed"), (1, "blocks.1.hook_resid_post")):
        logits = cache[name][:, -1] @ model.W_U
        got = frame[(frame["layer"] == layer) & (frame["label"] == "7")].sort_values("example")
        assert torch.allclose(torch.tensor(got["logit"].to_numpy(), dtype=torch.float32),
                              logits[:, 7], atol=1e-5)
        assert torch.allclose(torch.tensor(got["prob"].to_numpy(), dtype=torch.float32),
                              logits.softmax(-1)[:, 7], atol=1e-6)
        ranks = (logits > logits[:, 7:8]).sum(-1) + 1
        assert got["rank"].tolist() == ranks.tolist()
    with_norm = token_probabilities(model, cache, [7], batch=batch, layers=[1])
    assert not torch.allclose(torch.tensor(with_norm["logit"].to_numpy()),
                              torch.tensor(frame[(frame["layer"] == 1) & (frame["label"] == "7")]
                                           .sort_values("example")["logit"].to_numpy()))


def test_image_positions_and_tidy_columns(setup):
    model, batch, _, cache = setup
    frame = token_probabilities(model, cache, {"a": 3}, positions="image", batch=batch)
    assert list(frame.columns) == ["example", "layer", "position", "label", "token_id", "token",
                                   "logit", "prob", "rank"]
    n_image = sum(len(p) for p in batch.span("image"))
    assert len(frame) == n_image * model.cfg.n_layers
    for i in range(len(batch)):
        rows = frame[(frame["example"] == i) & (frame["layer"] == 0)]
        assert rows["position"].tolist() == batch.positions("image", i).tolist()


def test_answer_tokens_lower_and_capitalised(setup):
    model, batch, _, cache = setup
    model.processor = SimpleNamespace(tokenizer=tiny_tokenizer())
    try:
        tokens = answer_tokens(model, ["Yes", "yes"], wrong="no")
        assert tokens == {"answer": [10, 10], "Answer": [11, 11], "wrong": 12}
        frame = token_probabilities(model, cache, tokens, batch=batch)
        assert set(frame["token"]) == {"yes", "Yes", "no"}
        assert len(frame) == 3 * model.cfg.n_layers * len(batch)
        top = top_tokens(model, cache, k=3, batch=batch, positions="question")
    finally:
        model.processor = None
    assert list(top.columns) == ["example", "layer", "position", "rank", "token_id", "token",
                                 "logit", "prob"]
    first = top[(top["example"] == 0) & (top["layer"] == 2)]
    for _, group in first.groupby("position"):
        assert group["rank"].tolist() == [1, 2, 3]
        assert group["prob"].is_monotonic_decreasing
    resid = cache["blocks.2.hook_resid_post"][0, int(first["position"].iloc[0])]
    best = decode(model, resid).softmax(-1).max()
    assert first["prob"].iloc[0] == pytest.approx(best.item(), abs=1e-6)


@pytest.mark.parametrize("call, error, message", [
    (lambda m, b, c: token_probabilities(m, c, [1], layers=[7]), KeyError,
     "the cache has no blocks.7.hook_resid_post"),
    (lambda m, b, c: token_probabilities(m, c, [1], layers=[-3]), ValueError,
     "layer -3 is not a layer"),
    (lambda m, b, c: token_probabilities(m, c, {"x": [1, 2, 3]}, batch=b), ValueError,
     "gives 3 tokens but there are 2 examples"),
    (lambda m, b, c: token_probabilities(m, c, ["yes"]), ValueError,
     "the model has no tokenizer"),
    (lambda m, b, c: token_probabilities(m, c, [100]), ValueError,
     "token id 100 is outside the vocabulary"),
    (lambda m, b, c: token_probabilities(m, c, [1], positions=[40]), IndexError,
     "position 40 is outside the cached 28 positions"),
    (lambda m, b, c: token_probabilities(m, c, [1], positions="imag", batch=b), KeyError,
     "Did you mean image"),
    (lambda m, b, c: top_tokens(m, c, positions="question"), ValueError,
     "is a span name: pass batch="),
])
def test_bad_input(setup, call, error, message):
    model, batch, _, cache = setup
    with pytest.raises(error, match=re.escape(message)):
        call(model, batch, cache)
