"""The information-flow engine: fast == naive, empty knockouts, bad inputs, answer emergence."""

from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from tiny import IMAGE_TOKEN, tiny_inputs, tiny_llava

from mmlens import HookedMultimodalTransformer
from mmlens.data.example import Example
from mmlens.experiments import (
    DEFAULT_FLOWS,
    Knockout,
    dropped_examples,
    information_flow,
    sweep,
)
from mmlens.experiments.emergence import answer_emergence, emergence_frame
from mmlens.experiments.engine import clean_run, fast_knockout_probs, single_example
from mmlens.experiments.naive import naive_knockout_probs
from mmlens.inputs.batch import MultimodalBatch

TEXT_LAYERS = 5


def tiny_model(n_kv_heads: int) -> HookedMultimodalTransformer:
    hf = tiny_llava(text_layers=TEXT_LAYERS, n_kv_heads=n_kv_heads)
    return HookedMultimodalTransformer.from_hf_model(hf).eval(), hf.config


def tiny_batch(config, pad=(0, 2, 1)) -> MultimodalBatch:
    """Left-padded rows ``[bos, 3 system, 16 image, 5 question, 3 suffix]`` with every span."""
    inputs = tiny_inputs(config, batch=len(pad), suffix=8, pad=list(pad))
    spans = []
    for row in range(len(pad)):
        image = (inputs["input_ids"][row] == IMAGE_TOKEN).nonzero().flatten()
        width = inputs["input_ids"].shape[1]
        spans.append({
            "image": image, "question": torch.arange(image[-1] + 1, image[-1] + 6),
            "last": torch.tensor([width - 1]), "related": image[[1, 2, 5, 6]],
            "other": image[[0, 3, 4, *range(7, 16)]],
        })
    return MultimodalBatch(inputs["input_ids"], inputs["attention_mask"],
                           inputs["pixel_values"], spans)



@pytest.fixture(scope="module", params=[2, 4], ids=["gqa-heads", "mha"])
def model_and_batch(request):
    model, config = tiny_model(request.param)
    return model, tiny_batch(config)


def test_fast_equals_naive_for_every_default_flow(model_and_batch):
    model, batch = model_and_batch
    fast = information_flow(model, batch, window=3, only_correct=False, progress=False,
                            batch_size=5)
    naive = information_flow(model, batch, window=3, only_correct=False, progress=False,
                             method="naive")
    assert len(fast) == len(batch) * len(DEFAULT_FLOWS) * TEXT_LAYERS
    assert fast[["example_id", "flow", "layer"]].equals(naive[["example_id", "flow", "layer"]])
    for flow in DEFAULT_FLOWS:
        rows = fast.flow == flow
        diff = (fast.p_block[rows] - naive.p_block[rows]).abs().max()
        assert diff < 1e-5, f"{flow}: fast and naive differ by {diff}"
    # the knockouts do change the prediction, so equality above is not vacuous
    assert fast.rel_change.abs().max() > 1.0
    assert (fast.p_base == naive.p_base).all()


def test_fast_equals_naive_in_one_batch_and_windows_of_one(model_and_batch):
    model, batch = model_and_batch
    batch = batch.select([1, 2])
    kwargs = dict(window=1, only_correct=False, progress=False)
    fast = information_flow(model, batch, batch_size=1000, **kwargs)
    naive = information_flow(model, batch, method="naive", **kwargs)
    assert (fast.p_block - naive.p_block).abs().max() < 1e-5
    assert (fast.window_end - fast.window_start == 1).all()


def test_empty_knockouts_leave_the_prediction_unchanged(model_and_batch):
    model, batch = model_and_batch
    example = single_example(batch, 1)
    spans = example.spans[0]
    empty = torch.tensor([], dtype=torch.long)
    knockouts = [
        Knockout(spans["image"], spans["last"], ()),  # no layers
        Knockout(empty, spans["question"], (1, 2, 3)),  # no source
        Knockout(spans["image"], empty, (0, 1)),  # no target
    ]
    clean = clean_run(model, example)
    token = clean.prediction(exclude=IMAGE_TOKEN)
    for probs in (fast_knockout_probs(model, clean, knockouts, token),
                  naive_knockout_probs(model, example, knockouts, token)):
        assert torch.allclose(probs, torch.full_like(probs, clean.prob(token)), atol=1e-6)
    real = [Knockout(spans["question"], spans["last"], (3, 1, 2)),  # any layer order
            Knockout(spans["image"], spans["question"], (4, 0))]  # not contiguous
    fast = fast_knockout_probs(model, clean, real, token)
    assert (fast - naive_knockout_probs(model, example, real, token)).abs().max() < 1e-5
    assert (fast - clean.prob(token)).abs().min() > 1e-5


def test_user_spans_and_flows(model_and_batch):
    model, batch = model_and_batch
    extra = {"0": {"system": [1, 2, 3]}, "1": {"system": [3, 4]}, "2": {"system": [2]}}
    kwargs = dict(flows=["system->question", "image -> last"], window=3, only_correct=False,
                  progress=False, spans=extra)
    fast = information_flow(model, batch, **kwargs)
    naive = information_flow(model, batch, method="naive", **kwargs)
    assert set(fast.flow) == {"system->question", "image->last"}
    assert (fast.p_block - naive.p_block).abs().max() < 1e-5
    by_callable = information_flow(model, batch, **{
        **kwargs, "spans": lambda record, spans: {"system": spans["image"][:1] - 1}})
    assert len(by_callable) == len(fast)


def test_an_empty_span_skips_only_its_flow(model_and_batch):
    model, batch = model_and_batch
    batch = MultimodalBatch(batch.input_ids, batch.attention_mask, batch.pixel_values,
                            [dict(s) for s in batch.spans])
    batch.spans[1]["related"] = torch.tensor([], dtype=torch.long)
    df = information_flow(model, batch, window=3, only_correct=False, progress=False)
    assert set(df[df.flow == "related->question"].example_id) == {"0", "2"}
    assert set(df[df.flow == "other->question"].example_id) == {"0", "1", "2"}
    dropped = dropped_examples(df)
    assert dropped[["example_id", "flow"]].values.tolist() == [["1", "related->question"]]
    assert "related" in dropped.reason[0]
    only_related = information_flow(model, batch, flows=["related->question"], window=3,
                                    only_correct=False, progress=False)
    assert dropped_examples(only_related)[["example_id", "flow"]].values.tolist() == [
        ["1", "all"]]


@pytest.mark.parametrize("kwargs, message", [
    (dict(flows=["image->answer"]), "unknown span 'answer'"),
    (dict(flows=["image=>last"]), "SOURCE->TARGET"),
    (dict(flows=[]), "no flows"),
    (dict(window=TEXT_LAYERS + 1), "larger than the model"),
    (dict(window=0), "positive"),
    (dict(method="quick"), "unknown method"),
    (dict(only_correct=True), "gold answers"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_inputs_fail_before_any_compute(model_and_batch, monkeypatch, kwargs, message):
    model, batch = model_and_batch

    def no_compute(*args, **kw):
        raise AssertionError("the model ran before the inputs were checked")

    monkeypatch.setattr(sweep, "clean_run", no_compute)
    kwargs = {"only_correct": False, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        information_flow(model, batch, **kwargs)


class WordTokenizer:
    """Token ``i`` is the word ``w{i}``; enough of a tokenizer for the correctness filter."""

    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(word[1:]) for word in text.lower().split()]}

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(f"w{i}" for i in ids if not (skip_special_tokens and i == 2))


def test_correctness_filter_and_emergence(model_and_batch):
    model, batch = model_and_batch
    model.processor = SimpleNamespace(tokenizer=WordTokenizer())
    try:
        predicted = []
        for row in range(len(batch)):
            clean = clean_run(model, single_example(batch, row))
            predicted.append(clean.prediction(exclude=IMAGE_TOKEN))
        # gold = the model's first token; greedy decoding may continue, so pick max_new_tokens=1
        records = [Example(str(i), "q", f"W{t}" if i != 1 else "w1", "ChooseAttr", "img",
                           wrong_answer="w5") for i, t in enumerate(predicted)]
        labelled = MultimodalBatch(batch.input_ids, batch.attention_mask, batch.pixel_values,
                                   batch.spans, examples=records)
        df = information_flow(model, labelled, window=3, progress=False, max_new_tokens=1,
                              flows=["image->last"])
        assert set(df.example_id) == {"0", "2"}
        assert "wrong answer" in dropped_examples(df).reason[0]
        emergence = answer_emergence(model, labelled, progress=False, max_new_tokens=1)
        assert set(emergence.variant) == {"lower", "capitalised", "wrong", "wrong_capitalised"}
        # readings: paper (embeddings + every layer), no_norm and final_norm (every layer)
        assert len(emergence) == 2 * 4 * (3 * TEXT_LAYERS + 1)
        final = emergence[(emergence.layer == TEXT_LAYERS - 1)
                          & (emergence.reading == "final_norm") & (emergence.variant == "lower")]
        assert (final["rank"] == 1).all()
        assert torch.allclose(torch.tensor(final.prob.values, dtype=torch.float32),
                              torch.tensor(df.groupby("example_id").p_base.first().values,
                                           dtype=torch.float32), atol=1e-6)
        # the sweep's own clean runs give the same readings (one clean pass per example)
        shared = information_flow(model, labelled, window=3, progress=False, max_new_tokens=1,
                                  flows=["image->last"], lens=True)
        shared = emergence_frame(shared.attrs["records"])
        pd.testing.assert_frame_equal(shared.reset_index(drop=True),
                                      emergence.reset_index(drop=True), check_exact=False,
                                      atol=1e-6)
    finally:
        model.processor = None


def test_a_knockout_leaving_a_query_nothing_to_attend_to_is_refused(model_and_batch):
    model, batch = model_and_batch
    example = single_example(batch, 0)
    everything = torch.arange(example.input_ids.shape[1])
    knockouts = [Knockout(everything, example.spans[0]["last"], (1,))]
    clean = clean_run(model, example)
    with pytest.raises(ValueError, match="attend to nothing"):
        fast_knockout_probs(model, clean, knockouts, 0)
    with pytest.raises(ValueError, match="attend to nothing"):
        naive_knockout_probs(model, example, knockouts, 0)
