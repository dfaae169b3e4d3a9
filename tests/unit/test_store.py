"""Resumable results: interrupted runs resume with no lost and no duplicated rows."""

import json

import pytest
import torch
from tiny import IMAGE_TOKEN, tiny_inputs, tiny_llava

from mmlens import HookedMultimodalTransformer
from mmlens.experiments import ResultStore, information_flow, sweep
from mmlens.inputs.batch import MultimodalBatch

SIGNATURE = {"model": "m", "flows": ["image->last"], "window": 3}



def test_store_round_trip_and_refusals(tmp_path):
    path = tmp_path / "results.jsonl"
    store = ResultStore.open(path, SIGNATURE)
    store.append({"example_id": "a", "p": 0.1 + 0.2})
    with pytest.raises(ValueError, match="already in"):
        store.append({"example_id": "a", "p": 1.0})
    again = ResultStore.open(path, SIGNATURE)
    assert again.done == {"a": {"example_id": "a", "p": 0.1 + 0.2}}
    with pytest.raises(ValueError, match="window: stored 3, now 5"):
        ResultStore.open(path, {**SIGNATURE, "window": 5})
    (tmp_path / "other.jsonl").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="not an mmlens results store"):
        ResultStore.open(tmp_path / "other.jsonl", SIGNATURE)


def test_a_line_cut_off_mid_write_is_dropped_and_redone(tmp_path):
    path = tmp_path / "results.jsonl"
    store = ResultStore.open(path, SIGNATURE)
    store.append({"example_id": "a", "p": 1})
    with open(path, "a") as handle:
        handle.write('{"example_id":"b","p":')  # killed mid-write
    resumed = ResultStore.open(path, SIGNATURE)
    assert list(resumed.done) == ["a"]
    resumed.append({"example_id": "b", "p": 2})
    lines = path.read_text().splitlines()
    assert [json.loads(line)["example_id"] for line in lines[1:]] == ["a", "b"]


@pytest.fixture(scope="module")
def model_and_batch():
    hf = tiny_llava(text_layers=4, n_kv_heads=2)
    model = HookedMultimodalTransformer.from_hf_model(hf).eval()
    inputs = tiny_inputs(hf.config, batch=5, suffix=6, pad=[0, 1, 0, 2, 0])
    spans = []
    for row in range(5):
        image = (inputs["input_ids"][row] == IMAGE_TOKEN).nonzero().flatten()
        spans.append({"image": image, "question": torch.arange(image[-1] + 1, image[-1] + 4),
                      "last": torch.tensor([inputs["input_ids"].shape[1] - 1])})
    batch = MultimodalBatch(inputs["input_ids"], inputs["attention_mask"],
                            inputs["pixel_values"], spans)
    return model, batch


def test_resume_after_interruption_gives_identical_rows(model_and_batch, tmp_path, monkeypatch):
    model, batch = model_and_batch
    kwargs = dict(flows=["image->question", "question->last"], window=3, only_correct=False,
                  progress=False)
    reference = information_flow(model, batch, **kwargs)
    store = tmp_path / "flow.jsonl"
    real_engine, calls = sweep.fast_knockout_probs, []

    def interrupted(*args, **kw):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real_engine(*args, **kw)

    monkeypatch.setattr(sweep, "fast_knockout_probs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        information_flow(model, batch, store=store, **kwargs)
    stored = [json.loads(line)["example_id"] for line in store.read_text().splitlines()[1:]]
    assert stored == ["0", "1", "2"]

    monkeypatch.setattr(sweep, "fast_knockout_probs", real_engine)
    real_clean, computed = sweep.clean_run, []
    monkeypatch.setattr(sweep, "clean_run",
                        lambda m, ex: computed.append(1) or real_clean(m, ex))
    resumed = information_flow(model, batch, store=store, **kwargs)
    assert len(computed) == 2  # only the two examples the first run did not reach
    assert resumed.equals(reference)
    ids = [json.loads(line)["example_id"] for line in store.read_text().splitlines()[1:]]
    assert ids == ["0", "1", "2", "3", "4"]
    again = information_flow(model, batch, store=store, **kwargs)
    assert again.equals(reference) and len(computed) == 2

    with pytest.raises(ValueError, match="other arguments"):
        information_flow(model, batch, store=store, **{**kwargs, "window": 1})

