"""The free-form study: its rows are answer_flow's, a killed run resumes without losing or
repeating an example, a folder refuses a run that forces other answers, the filter keeps only
answers equal to the reference."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from tiny import small_shapes_model

from mmlens.data.shapes import generate_per_task
from mmlens.experiments.free_form import study as study_module
from mmlens.experiments.free_form.study import answer_study, answer_summary_frame
from mmlens.experiments.presets import resolve_settings
from mmlens.experiments.runfolder.store import read_store
from mmlens.inputs.prepare import prepare_examples
from mmlens.methods.answer_flow import answer_flow, answer_summary

FLOWS = ["image->answer", "question->answer", "related->answer", "other->answer"]
MAX_NEW = 3


@pytest.fixture(scope="module")
def setup():
    model = small_shapes_model()
    settings = resolve_settings(model, "none", window=3)
    examples = generate_per_task(3, seed=4, tasks=["Describe"])
    return model, settings, examples


def run(setup, **kwargs):
    model, settings, examples = setup
    options = dict(settings=settings, flows=FLOWS, only_correct=False, max_new_tokens=MAX_NEW,
                   progress=False)
    return answer_study(model, examples, **{**options, **kwargs})


@pytest.mark.parametrize("forced", ["generated", "reference"])
def test_rows_equal_answer_flow_called_directly(setup, forced):
    model, settings, examples = setup
    frame = run(setup, forced=forced)
    batch = prepare_examples(model, examples, **settings.prepare_options())
    if forced == "generated":
        direct = answer_flow(model, batch, flows=FLOWS, window=3, max_new_tokens=MAX_NEW)
    else:  # the reference, capitalised as this model's (random) answers are not: as written
        answers = [r["answer"] for r in frame.attrs["records"]]
        assert [a.lower() for a in answers] == [e.answer for e in examples]
        direct = answer_flow(model, batch, answers=answers, flows=FLOWS, window=3)
    assert len(frame) == len(direct) > 0
    ids = [e.example_id for e in examples]
    direct = direct.assign(example_id=direct["example"].map(dict(enumerate(ids))))
    for column in ("answer", "flow", "layer", "index", "token"):
        assert frame[column].tolist() == direct[column].tolist(), column
    for column in ("logprob_base", "logprob_block"):
        assert (frame[column] - direct[column]).abs().max() <= 1e-6, column
    assert (frame.logprob_block - frame.logprob_base).abs().max() > 1e-4  # knockouts bite
    mine = answer_summary_frame(frame)
    theirs = answer_summary(direct.drop(columns="example_id"))
    for column in ("seq_logprob_change", "norm_prob_change", "fg_tracer_change"):
        assert (mine[column] - theirs[column]).abs().max() <= 1e-6
    assert (mine["fg_tracer_change"] == mine["norm_prob_change"].clip(upper=0)).all()


def test_the_filter_keeps_only_answers_equal_to_the_reference(setup):
    frame = run(setup, only_correct=True)
    records = frame.attrs["records"]
    for record in records:
        same = record["model_answer"].strip().lower() == record["reference"]
        assert bool(record.get("dropped")) != same
    assert set(frame["example_id"]) == {r["example_id"] for r in records if not r.get("dropped")}


def test_a_killed_run_resumes_without_losing_or_repeating(setup, tmp_path, monkeypatch):
    store = tmp_path / "answer_flow.jsonl"
    calls = []
    real = study_module.answer_flow

    def dies_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(study_module, "answer_flow", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        run(setup, store=store)
    assert len(read_store(store)[1]) == 1
    monkeypatch.setattr(study_module, "answer_flow", real)
    resumed = run(setup, store=store)
    fresh = run(setup)
    pd.testing.assert_frame_equal(resumed, fresh)
    lines = store.read_text().splitlines()[1:]
    assert sorted(json.loads(line)["example_id"] for line in lines) == sorted(
        e.example_id for e in setup[2])
    with pytest.raises(ValueError, match="forced: stored 'generated', now 'reference'"):
        run(setup, store=store, forced="reference")
