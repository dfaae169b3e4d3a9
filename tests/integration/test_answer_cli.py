"""`mmlens flow` with a free-form task: a mixed run writes both studies and one run.json, its
report has the free-form section with numbers equal to its tables, a rerun forcing the
reference is refused, and bad arguments end in one line."""

from __future__ import annotations

import html
import json

import pandas as pd
import pytest

from mmlens.cli import main
from mmlens.experiments.report.answers import answer_figures
from mmlens.experiments.report.captions import flow_caption
from mmlens.experiments.tables import check_run_folder
from mmlens.model.hooked import HookedMultimodalTransformer
from mmlens.zoo import BUNDLED

pytestmark = pytest.mark.skipif(not (BUNDLED["shapes-llava"] / "config.json").is_file(),
                                reason="shapes-llava is not bundled here")
MIXED = ["--tasks", "ChooseAttr,Describe", "--per-task", "2", "--window", "3", "--flows",
         "image->last", "--no-filter", "--quiet"]


@pytest.fixture(scope="module")
def loads():
    return []


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, loads):
    out = tmp_path_factory.mktemp("mixed")
    load = HookedMultimodalTransformer.from_pretrained
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HookedMultimodalTransformer, "from_pretrained",
                      lambda *a, **k: loads.append(a) or load(*a, **k))
        assert main(["flow", *MIXED, "--out", str(out)]) == 0
    return out


def test_a_mixed_run_loads_the_model_once(run_dir, loads):
    assert loads == [("shapes-llava",)]


def test_a_mixed_run_writes_both_studies_into_one_folder(run_dir):
    summary = check_run_folder(run_dir)
    free = summary["free_form"]
    assert free["forced"] == "generated" and free["filter"].startswith("none (--no-filter)")
    assert free["n_examples"] == 2 and summary["n_examples"] == 2  # Describe / ChooseAttr
    assert set(pd.read_csv(run_dir / "flow.csv")["task"]) == {"ChooseAttr"}
    tokens = pd.read_csv(run_dir / "answer_flow.csv")
    assert set(tokens["task"]) == {"Describe"}
    assert set(tokens["flow"]) == {"image->answer", "question->answer", "related->answer",
                                   "other->answer"}
    assert {"answer_flow.csv", "answer_summary.csv", "answer_peaks.csv",
            "flow.csv"} <= set(summary["tables"])


def test_the_report_section_shows_the_tables_numbers(run_dir):
    page = (run_dir / "report.html").read_text()
    assert "Free-form answers" in page and "per answer token" in page
    summary = json.loads((run_dir / "run.json").read_text())
    per_answer = pd.read_csv(run_dir / "answer_summary.csv")
    peaks = pd.read_csv(run_dir / "answer_peaks.csv")
    figures = {title: (note, figure) for title, note, figure in answer_figures(run_dir, summary)}
    title = "Free-form answers: length-normalised probability, relative change (%)"
    note, figure = figures[title]
    means = per_answer.groupby(["flow", "layer"])["norm_prob_change"].mean()
    for trace in figure.data:
        if trace.mode == "lines" and trace.name in set(per_answer["flow"]):
            assert list(trace.y) == pytest.approx(means[trace.name].tolist())
    rows = peaks[peaks["metric"] == "norm_prob_change"]
    for flow in set(per_answer["flow"]):
        caption = flow_caption(rows, flow, 3, 8)
        assert caption and caption in note and html.escape(caption) in page
    tokens = pd.read_csv(run_dir / "answer_flow.csv")
    change = (tokens.logprob_block - tokens.logprob_base).groupby(
        [tokens["flow"], tokens["index"], tokens["layer"]]).mean()
    _, token_figure = figures["Free-form answers: image->answer, per answer token"]
    for trace in token_figure.data:
        if trace.mode == "lines" and trace.name.startswith("image->answer, token "):
            index = int(trace.name.rsplit(" ", 1)[1])
            assert list(trace.y) == pytest.approx(change["image->answer", index].tolist())


def test_shards_of_a_mixed_run_merge_into_its_tables(run_dir, tmp_path):
    parts = [tmp_path / f"part-{k}" for k in range(2)]
    for k, part in enumerate(parts):
        assert main(["flow", *MIXED, "--no-word-maps", "--shard", f"{k}/2", "--out",
                     str(part)]) == 0
    assert main(["merge", str(tmp_path / "all"), *map(str, parts)]) == 0
    merged = check_run_folder(tmp_path / "all")
    assert merged["n_examples"] == 2 and merged["free_form"]["n_examples"] == 2
    for table in ("flow.csv", "summary.csv", "answer_flow.csv", "answer_summary.csv",
                  "answer_peaks.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "all" / table),
                                      pd.read_csv(run_dir / table))


def test_forcing_the_reference_into_a_folder_of_generated_answers_is_refused(run_dir, capsys):
    assert main(["flow", *MIXED, "--reference", "--out", str(run_dir)]) == 2
    assert "forced: stored 'generated', now 'reference'" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "ChooseAttr", "--reference"], "add one of Describe to --tasks"),
    (["--tasks", "Describe", "--answer-flows", "image->last"], "unknown answer flow"),
    (["--tasks", "Describe", "--data", "tests/fixtures/gqa_mini"], "pass --data shapes"),
    (["--tasks", "ChooseAttr,Describe", "--shard", "1/2"],
     "shard 1/2 holds none of the 1 free-form examples: split into at most 1 shards"),
])
def test_bad_free_form_arguments_are_one_line(tmp_path, capsys, extra, message):
    assert main(["flow", "--per-task", "1", "--quiet", "--out", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1
