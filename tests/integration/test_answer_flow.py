"""Flows into a free-form answer: the resumed (fast) path equals one full forward per variant
(block_attention), the clean log-probabilities equal step-by-step prediction of the answer,
the summary's metrics follow from the tokens; the JSONL loader and its refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import small_shapes_model

from mmlens.core.errors import MMLensError
from mmlens.data.answers_jsonl import load_answers_jsonl
from mmlens.data.shapes import generate_per_task
from mmlens.inputs.prepare import prepare_examples
from mmlens.methods.answer_flow import answer_flow, answer_summary


@pytest.fixture(scope="module")
def small():
    model = small_shapes_model()
    return model, prepare_examples(model, generate_per_task(
        1, seed=1, tasks=["ChooseAttr", "QueryAttr"]))


@pytest.mark.parametrize("answers", [["a red square", "left"], None],
                         ids=["references", "generated"])
def test_fast_equals_one_forward_per_variant(small, answers):
    model, batch = small
    kwargs = dict(answers=answers, window=3, centres=[0, 2, 3], max_new_tokens=3)
    fast = answer_flow(model, batch, **kwargs)
    naive = answer_flow(model, batch, fast=False, **kwargs)
    assert len(fast) == len(naive) > 0
    assert fast.drop(columns="logprob_block").equals(naive.drop(columns="logprob_block"))
    assert (fast.logprob_block - naive.logprob_block).abs().max() <= 1e-6
    assert (fast.logprob_block - fast.logprob_base).abs().max() > 1e-4  # knockouts bite


def test_clean_logprobs_are_the_answer_predicted_token_by_token(small):
    model, batch = small
    frame = answer_flow(model, batch, answers=["a red square", "left"], centres=[1], window=1)
    for example, answer in enumerate(["a red square", "left"]):
        ids = model.tokenizer(answer, add_special_tokens=False)["input_ids"]
        prompt = batch.select(example)
        expected = []
        with torch.no_grad():
            for step, token in enumerate(ids):
                extended = torch.cat([prompt.input_ids, torch.tensor([ids[:step]],
                                                                      dtype=torch.long)], 1)
                logits = model(extended, prompt.pixel_values,
                               attention_mask=torch.ones_like(extended))
                expected.append(float(logits[0, -1].float().log_softmax(-1)[token]))
        rows = frame[(frame.example == example) & (frame.flow == "image->answer")]
        assert rows.token.tolist() == ids
        np.testing.assert_allclose(rows.logprob_base, expected, atol=1e-5)


def test_summary_metrics(small):
    model, batch = small
    frame = answer_flow(model, batch, answers=["a red square", "left"], centres=[2], window=1)
    summary = answer_summary(frame)
    row = summary[(summary.example == 0) & (summary.flow == "question->answer")].iloc[0]
    tokens = frame[(frame.example == 0) & (frame.flow == "question->answer")]
    assert row.n_tokens == 3 and row.answer == "a red square"
    assert row.seq_logprob_change == pytest.approx(
        tokens.logprob_block.sum() - tokens.logprob_base.sum())
    base, block = np.exp(tokens.logprob_base.mean()), np.exp(tokens.logprob_block.mean())
    assert row.norm_prob_change == pytest.approx((block - base) / base * 100)


def test_jsonl_references_run_the_flow(small, tmp_path):
    model, _ = small
    Image.new("RGB", (56, 56), (200, 30, 30)).save(tmp_path / "red.png")
    lines = [{"image": "red.png", "prompt": "Describe the scene.", "reference": "red square",
              "boxes": [[0, 0, 20, 20]], "id": "r1", "task": "Describe"},
             {"image": "red.png", "prompt": "What colour is it?", "reference": "red"}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    examples = load_answers_jsonl(tmp_path / "data.jsonl")
    assert [(e.example_id, e.task, e.answer, e.boxes) for e in examples] == [
        ("r1", "Describe", "red square", [(0.0, 0.0, 20.0, 20.0)]),
        ("data-2", "FreeForm", "red", [])]
    batch = prepare_examples(model, examples)
    frame = answer_flow(model, batch, answers=[e.answer for e in examples], centres=[0],
                        window=1)
    assert frame.groupby("example").size().tolist() == [4, 2]  # 2 flows x answer tokens


@pytest.mark.parametrize("line, message", [
    ("{not json", "is not JSON"),
    ('["a list"]', "not an object"),
    ('{"image": "red.png", "prompt": "Describe."}', "lacks reference"),
    ('{"image": "../red.png", "prompt": "p", "reference": "r"}', "outside the images folder"),
    ('{"image": "blue.png", "prompt": "p", "reference": "r"}', "is not in"),
    ('{"image": "red.png", "prompt": "p", "reference": "r", "boxes": [[1, 2, 3]]}',
     "must be four numbers"),
])
def test_bad_jsonl_lines_are_refused(tmp_path, line, message):
    Image.new("RGB", (8, 8)).save(tmp_path / "red.png")
    (tmp_path / "data.jsonl").write_text(line + "\n")
    with pytest.raises((MMLensError, FileNotFoundError), match=message):
        load_answers_jsonl(tmp_path / "data.jsonl")


def test_bad_flow_arguments_are_refused(small):
    model, batch = small
    with pytest.raises(MMLensError, match="unknown answer flow"):
        answer_flow(model, batch, answers=["a", "b"], flows=["image->last"])
    with pytest.raises(MMLensError, match="1 answers for 2 examples"):
        answer_flow(model, batch, answers=["a"])
