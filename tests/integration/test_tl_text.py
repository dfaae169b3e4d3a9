"""TransformerLens's text habits on the bundled model: token strings and positions, text input
to forward and generate, generate's options, from_pretrained's keyword arguments, and a
batch's short repr, token strings and span errors."""

import dataclasses

import pytest
import torch
from PIL import Image

from mmlens import HookedMultimodalTransformer
from mmlens.model.generation import nucleus


@pytest.fixture(scope="module")
def model():
    return HookedMultimodalTransformer.from_pretrained("shapes-llava")


@pytest.fixture(scope="module")
def batch(model):
    images = [Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (40, 40), "blue")]
    return model.prepare(images, ["Is there a red square?", "What color is the circle?"])


def test_to_str_tokens_and_get_token_position(model):
    text = "is the red square left of the red circle"
    ids = model.to_tokens(text)[0]
    strings = model.to_str_tokens(text)
    assert strings == [model.tokenizer.decode([int(i)]) for i in ids]
    assert strings[0] == model.tokenizer.bos_token
    assert model.to_str_tokens(text, prepend_bos=False) == strings[1:]
    assert model.to_str_tokens(ids) == strings == model.to_str_tokens(ids[None])
    assert model.to_str_tokens([text, "red"]) == [strings, model.to_str_tokens("red")]
    red = model.to_single_token("red")
    occurrences = (ids == red).nonzero()[:, 0].tolist()
    assert len(occurrences) == 2
    assert model.get_token_position("red", text) == occurrences[0]
    assert model.get_token_position(red, ids, mode="last") == occurrences[1]
    with pytest.raises(ValueError, match="does not occur"):
        model.get_token_position("blue", text)
    with pytest.raises(ValueError, match="batch of 2"):
        model.to_str_tokens(torch.stack([ids, ids]))


def test_text_input_runs_like_its_tokens(model):
    text = "what color is the square"
    with torch.no_grad():
        torch.testing.assert_close(model(text), model(model.to_tokens(text)))
        loss = model(text, return_type="loss")
        logits = model(model.to_tokens(text))
    ids = model.to_tokens(text)
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    torch.testing.assert_close(loss, expected)


def test_generate_from_text_and_its_options(model):
    prompt = "is the square red"
    greedy = model.generate(prompt, max_new_tokens=4, stop_at_eos=False, return_type="tokens")
    tokens = model.to_tokens(prompt)
    with torch.no_grad():
        for _ in range(4):  # the greedy loop written out, without a key/value cache
            logits = model(tokens)[:, -1]
            logits[:, model.cfg.image_token_id] = float("-inf")
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, tokens)
    text = model.generate(prompt, max_new_tokens=4, stop_at_eos=False)
    assert isinstance(text, str) and text.startswith(prompt)
    assert text == model.tokenizer.decode(greedy[0], skip_special_tokens=True)
    # A tiny nucleus keeps only the most likely token: sampling is greedy.
    sampled = model.generate(prompt, max_new_tokens=4, stop_at_eos=False, do_sample=True,
                             top_p=1e-6, seed=0, verbose=True, return_type="tokens")
    assert torch.equal(sampled, greedy)
    with pytest.raises(ValueError, match="top_p must be in"):
        model.generate(prompt, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="'input', 'tokens' or 'str'"):
        model.generate(prompt, return_type="text")


def test_stop_at_eos(model):
    prompt = "is the square red"
    eos = int(model.generate(prompt, max_new_tokens=1, return_type="tokens")[0, -1])
    stopped = model.generate(prompt, max_new_tokens=5, eos_token_id=eos, return_type="tokens")
    assert stopped.shape[1] == model.to_tokens(prompt).shape[1] + 1
    running = model.generate(prompt, max_new_tokens=5, eos_token_id=eos, stop_at_eos=False,
                             return_type="tokens")
    assert running.shape[1] == model.to_tokens(prompt).shape[1] + 5


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).log_softmax(-1)
    probs = logits.exp()[0]
    kept = ~torch.isinf(nucleus(logits, 0.8))[0]
    cumulative = probs.cumsum(0)
    n_needed = int((cumulative < 0.8).sum()) + 1
    assert kept.tolist() == [i < n_needed for i in range(4)]


def test_from_pretrained_refuses_folding_and_unknown_keywords():
    with pytest.raises(TypeError, match="does not support fold_ln=: weights are loaded unfolded"):
        HookedMultimodalTransformer.from_pretrained("shapes-llava", fold_ln=True)
    with pytest.raises(TypeError, match="RMSNorm does not subtract the mean"):
        HookedMultimodalTransformer.from_pretrained("shapes-llava", center_writing_weights=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'n_devices': it accepts "
                                        "dtype, device, revision"):
        HookedMultimodalTransformer.from_pretrained("shapes-llava", n_devices=2)


def test_batch_repr_str_tokens_and_span_errors(model, batch):
    text = repr(batch)
    assert len(text) < 300
    assert f"{len(batch)} examples x {batch.input_ids.shape[1]} positions" in text
    assert "question" in text
    strings = batch.str_tokens
    assert len(strings) == 2 and all(len(row) == batch.input_ids.shape[1] for row in strings)
    for i in range(2):
        assert {strings[i][p] for p in batch.positions("image", i).tolist()} == {
            model.tokenizer.convert_ids_to_tokens(model.cfg.image_token_id)}
        last = int(batch.positions("last", i))
        assert strings[i][last] == model.tokenizer.decode([int(batch.input_ids[i, last])])
    assert model.to_str_tokens(batch) == strings
    bare = dataclasses.replace(batch, tokenizer=None)  # a batch built by hand
    assert model.to_str_tokens(bare) == strings
    with pytest.raises(ValueError, match="this batch has no tokenizer"):
        _ = bare.str_tokens
    with pytest.raises(KeyError, match="pass boxes= to model.prepare"):
        batch.span("related")
