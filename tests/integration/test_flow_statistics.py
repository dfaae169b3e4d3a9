"""The study's statistics on the bundled model: logit-diff's paired tokens against a plain
forward, counts of examples with a value, the control seed and draws, the paper's lens axis,
the correctness filter's length and the warning when every example is dropped."""

import json

import pandas as pd
import pytest
import torch

from mmlens import HookedMultimodalTransformer
from mmlens.experiments import dropped_examples, information_flow
from mmlens.experiments.emergence import emergence_frame
from mmlens.experiments.examples import ExampleSource
from mmlens.experiments.metrics import NO_FOIL
from mmlens.experiments.provenance import example_lines
from mmlens.experiments.study import load_examples, run_study
from mmlens.experiments.summary import flow_summary
from mmlens.experiments.sweep import AllDroppedWarning
from mmlens.zoo import BUNDLED

pytestmark = pytest.mark.skipif(not (BUNDLED["shapes-llava"] / "config.json").is_file(),
                                reason="shapes-llava is not bundled here")
FLOWS = ["question->last", "related->question"]


@pytest.fixture(scope="module")
def study():
    model = HookedMultimodalTransformer.from_pretrained("shapes-llava")
    examples = load_examples("shapes", tasks=["ChooseAttr", "CompareAttr"], per_task=2, seed=0)
    frame = information_flow(model, examples, flows=FLOWS, metric="logit-diff", controls=True,
                             lens=True, progress=False)
    return model, examples, frame


def test_logit_diff_pairs_the_answer_and_wrong_option_in_the_produced_form(study):
    model, examples, frame = study
    tokenizer = model.tokenizer
    source = ExampleSource(model, examples)
    records = {r["example_id"]: r for r in frame.attrs["records"]}
    lines = {line["example_id"]: line for line in example_lines(frame.attrs["records"])}
    paired = 0
    for index, example in enumerate(examples):
        record, line = records[example.example_id], lines[example.example_id]
        if example.task != "ChooseAttr":
            assert line["metric_tokens"] is None
            continue
        answer, foil = line["metric_tokens"]["answer"], line["metric_tokens"]["foil"]
        # the produced token is the answer, and the wrong option is in its form (Red vs Blue)
        assert answer == record["answer_token"]
        said, other = tokenizer.decode([answer]), tokenizer.decode([foil])
        assert said.strip().lower() == example.answer and other.strip().lower() == (
            example.wrong_answer)
        assert said.strip()[0].isupper() == other.strip()[0].isupper()
        # the clean logit difference, against a plain forward of the same prompt
        batch = source.prepare(index)
        with torch.no_grad():
            logits = model(batch.input_ids, batch.pixel_values)[0, -1].float()
        rows = frame[frame.example_id == example.example_id]
        expected = float(logits[answer] - logits[foil])
        assert rows.metric_base.to_numpy() == pytest.approx(expected, abs=1e-4)
        paired += 1
    assert paired == 2


def test_only_examples_with_a_value_are_counted_and_the_rest_say_why(study):
    _, _, frame = study
    summary = flow_summary(frame, n_boot=50).set_index(["task", "flow"])
    for flow in FLOWS:
        assert summary.loc[("ChooseAttr", flow)].n_examples == 2
        assert summary.loc[("CompareAttr", flow)].n_examples == 0
        assert summary.loc[("all", flow)].n_examples == 2
    dropped = dropped_examples(frame)
    no_foil = dropped[dropped.reason == NO_FOIL]
    assert set(no_foil.task) == {"CompareAttr"} and len(no_foil) == 2 * 2 * len(FLOWS)


def test_text_controls_draw_from_the_prompt_never_bos_last_or_the_target(study):
    _, _, frame = study
    for line in example_lines(frame.attrs["records"]):
        spans = line["spans"]
        drawn = spans["random_question"]
        assert len(drawn) == len(spans["question"]) == len(set(drawn))
        allowed = set(spans["text"]) - set(spans["bos"]) - set(spans["last"])
        assert set(drawn) <= allowed and spans["bos"] == [0]
        if "random_related" in spans:  # image sources draw image positions
            assert set(spans["random_related"]) <= set(spans["image"])
            assert len(spans["random_related"]) == len(spans["related"])


def test_the_paper_reading_is_labelled_on_hidden_states_0_to_L(study):
    model, _, frame = study
    table = emergence_frame(frame.attrs["records"])
    n_layers = model.cfg.n_layers
    paper = table[table.reading == "paper"]
    assert sorted(set(paper.layer)) == list(range(n_layers + 1))
    # layer l + 1 of the paper's axis is the residual after layer l (no_norm's layer l)
    no_norm = table[table.reading == "no_norm"]
    assert sorted(set(no_norm.layer)) == list(range(n_layers))
    keys = ["example_id", "variant"]
    shifted = no_norm[no_norm.layer < n_layers - 1].assign(layer=lambda t: t.layer + 1)
    both = shifted.merge(paper, on=[*keys, "layer"])
    assert len(both) == len(shifted)
    assert (both.prob_x - both.prob_y).abs().max() < 1e-6


def test_control_seed_and_filter_length_are_settings_of_the_run(tmp_path):
    options = {"tasks": ["ChooseAttr"], "per_task": 1, "flows": "question->last",
               "progress": False, "controls": True}
    out = run_study(tmp_path / "run", control_seed=5, filter_max_new_tokens=16, **options)
    run = json.loads((out / "run.json").read_text())
    assert (run["control_seed"], run["filter_max_new_tokens"]) == (5, 16)
    assert run["arguments"]["seed"] == 0
    default = run_study(tmp_path / "default", **options)
    by_default = json.loads((default / "run.json").read_text())
    assert (by_default["control_seed"], by_default["filter_max_new_tokens"]) == (0, 128)
    spans = [json.loads(line)["spans"] for line in
             (out / "examples.jsonl").read_text().splitlines()]
    assert all(len(s["random_question"]) == len(s["question"]) for s in spans)
    # the same folder with another control seed or filter length is another run: refused
    for changed in ({"control_seed": 6, "filter_max_new_tokens": 16},
                    {"control_seed": 5, "filter_max_new_tokens": 8}):
        with pytest.raises(ValueError, match="other arguments"):
            run_study(out, **changed, **options)
    with pytest.raises(ValueError, match="filter_max_new_tokens.*at least 1"):
        run_study(tmp_path / "bad", filter_max_new_tokens=0, **options)


def test_information_flow_warns_with_the_counts_when_every_example_is_dropped(study):
    model, examples, _ = study
    wrong = [type(e)(**{**e.__dict__, "answer": "purple"}) for e in examples[:2]]
    with pytest.warns(AllDroppedWarning, match=r"all 2 examples were dropped \(2 wrong answer"
                      r"\).*only_correct=False"):
        frame = information_flow(model, wrong, flows=["question->last"], progress=False)
    assert frame.empty and len(dropped_examples(frame)) == 2
    assert pd.Series([r.get("dropped") for r in frame.attrs["records"]]).str.startswith(
        "wrong answer").all()


def test_the_cli_passes_the_control_seed_and_filter_length_on():
    from mmlens.cli import _parser, _settings

    for command in ("flow", "reproduce"):
        required = [] if command == "flow" else ["--model", "m", "--gqa-images", "i",
                                                 "--subsets", "s", "--out", "o"]
        args = _parser().parse_args([command, *required, "--control-seed", "3",
                                     "--filter-max-new-tokens", "32"])
        settings = _settings(args)
        assert (settings["control_seed"], settings["filter_max_new_tokens"]) == (3, 32)
