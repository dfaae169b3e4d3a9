"""`mmlens flow --data answers.jsonl`: the free-form study on a user's file of
{image, prompt, reference, boxes?} lines, built here from shapes images. Its tables equal the
study run in Python on the loaded examples, a resume after the file changed is refused naming
the file, a file without boxes runs only the flows that need none (naming one is refused), and
shards merge into the single run's tables, and each bad input ends in one line saying what
to do."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from mmlens.cli import main
from mmlens.data.answers_jsonl import load_answers_jsonl
from mmlens.data.shapes import generate_per_task
from mmlens.experiments import study
from mmlens.experiments.free_form.study import answer_study
from mmlens.experiments.presets import resolve_settings
from mmlens.experiments.runfolder.distributed import Ranks
from mmlens.experiments.tables import check_run_folder
from mmlens.model.hooked import HookedMultimodalTransformer
from mmlens.zoo import BUNDLED

pytestmark = pytest.mark.skipif(not (BUNDLED["shapes-llava"] / "config.json").is_file(),
                                reason="shapes-llava is not bundled here")
RUN = ["flow", "--window", "3", "--quiet"]


def write_answers(folder, boxes=True):
    """Two Describe questions of the bundled data as a JSONL file with its images beside it."""
    lines = []
    for example in generate_per_task(2, seed=0, tasks=["Describe"]):
        name = f"{example.example_id}.png"
        example.load_image().save(folder / name)
        lines.append({"image": name, "prompt": example.question, "reference": example.answer,
                      "id": example.example_id,
                      **({"boxes": [list(b) for b in example.boxes]} if boxes else {})})
    path = folder / "answers.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def boxed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("boxed")
    path, out = write_answers(folder), folder / "run"
    assert main([*RUN, "--data", str(path), "--out", str(out)]) == 0
    return path, out


def test_the_file_runs_the_free_form_study_with_its_tables_and_report(boxed):
    path, out = boxed
    summary = check_run_folder(out)
    free = summary["free_form"]
    assert free["arguments"]["data"] == str(path) and free["forced"] == "generated"
    assert free["n_examples"] == 2 and not (out / "flow.csv").exists()
    tokens = pd.read_csv(out / "answer_flow.csv")
    assert set(tokens["flow"]) == {"image->answer", "question->answer", "related->answer",
                                   "other->answer"}
    assert "Free-form answers" in (out / "report.html").read_text()
    model = HookedMultimodalTransformer.from_pretrained("shapes-llava")
    direct = answer_study(model, load_answers_jsonl(path), progress=False,
                          settings=resolve_settings(model, None, window=3))
    assert len(direct) == len(tokens) and free["n_kept"] == direct["example_id"].nunique()
    assert tokens["example_id"].tolist() == direct["example_id"].tolist()
    assert tokens["logprob_block"].to_numpy() == pytest.approx(
        direct["logprob_block"].to_numpy(), abs=1e-6)


def test_a_resume_after_the_file_changed_is_refused_naming_it(boxed, capsys):
    path, out = boxed
    assert main([*RUN, "--data", str(path), "--out", str(out)]) == 0  # resumes: nothing to do
    lines = path.read_text().splitlines()
    edited = json.loads(lines[0]) | {"reference": "big blue circle"}
    changed = path.parent / "edited" / "answers.jsonl"
    changed.parent.mkdir()
    for line in lines:
        image = json.loads(line)["image"]
        (changed.parent / image).write_bytes((path.parent / image).read_bytes())
    changed.write_text("\n".join([json.dumps(edited), *lines[1:]]) + "\n")
    capsys.readouterr()
    assert main([*RUN, "--data", str(changed), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "answers_file: stored {'name': 'answers.jsonl', 'sha256':" in err
    assert "examples.answers" in err and err.count("error:") == 1


def test_a_file_without_boxes_runs_the_flows_that_need_none(tmp_path):
    path = write_answers(tmp_path, boxes=False)
    out = tmp_path / "run"
    assert main([*RUN, "--data", str(path), "--reference", "--out", str(out)]) == 0
    summary = check_run_folder(out)
    assert summary["free_form"]["forced"] == "reference"
    assert summary["free_form"]["arguments"]["flows"] == ["image->answer", "question->answer"]
    answers = pd.read_csv(out / "answer_summary.csv").drop_duplicates("example_id")
    references = {e.example_id: e.answer for e in load_answers_jsonl(path)}
    assert [references[i] for i in answers["example_id"]] == answers["answer"].str.lower(
        ).str.strip().tolist()


def test_shards_merge_into_the_single_runs_tables(boxed, tmp_path, capsys):
    path, single = boxed
    parts = [tmp_path / f"part-{k}" for k in range(2)]
    for k, part in enumerate(parts):
        assert main([*RUN, "--data", str(path), "--shard", f"{k}/2", "--out", str(part)]) == 0
        assert check_run_folder(part)["free_form"]["n_examples"] == 1
    assert main(["merge", str(tmp_path / "all"), *map(str, parts)]) == 0
    merged = check_run_folder(tmp_path / "all")
    assert merged["free_form"]["n_examples"] == 2 and merged["free_form"]["arguments"][
        "shard"] is None
    for table in ("answer_flow.csv", "answer_summary.csv", "answer_peaks.csv",
                  "answer_dropped.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "all" / table),
                                      pd.read_csv(single / table))
    assert (tmp_path / "all" / "answer_views.json").read_text() == (
        single / "answer_views.json").read_text()
    assert "Free-form answers" in (tmp_path / "all" / "report.html").read_text()
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "half"), str(parts[0])]) == 2
    assert "1 of 2 free-form examples are in no shard" in capsys.readouterr().err


def test_a_line_without_boxes_skips_the_boxed_flows_for_itself(tmp_path):
    path = write_answers(tmp_path)
    first, second = path.read_text().splitlines()
    path.write_text(first + "\n" + json.dumps(json.loads(second) | {"boxes": []}) + "\n")
    out = tmp_path / "run"
    assert main([*RUN, "--data", str(path), "--no-filter", "--out", str(out)]) == 0
    unboxed = load_answers_jsonl(path)[1].example_id
    tokens = pd.read_csv(out / "answer_flow.csv")
    assert set(tokens[tokens.example_id == unboxed]["flow"]) == {"image->answer",
                                                                  "question->answer"}
    assert len(set(tokens[tokens.example_id != unboxed]["flow"])) == 4
    dropped = pd.read_csv(out / "answer_dropped.csv").set_index("flow")
    assert (dropped["example_id"] == unboxed).all()
    assert dropped.loc["related->answer", "reason"] == "empty span 'related'"
    assert dropped.loc["other->answer", "reason"].startswith("no related patches (no boxes)")


@pytest.mark.parametrize("extra, lines, message", [
    (["--answer-flows", "image->answer,other->answer"], None,
     "answers.jsonl has no boxes: the flows other->answer"),
    (["--tasks", "Describe"], None, "drop --tasks"),
    ([], ["{not json"], "answers.jsonl, line 1 is not JSON"),
    ([], ['{"image": "a.png", "prompt": "p"}'], "line 1 lacks reference"),
    ([], ['{"image": "gone.png", "prompt": "p", "reference": "r"}'], "'gone.png' is not in"),
    ([], ['{"image": "a.png", "prompt": "p", "reference": "r", "id": "x"}'] * 2,
     "line 2 repeats the id 'x' of line 1"),
])
def test_bad_inputs_are_one_line(tmp_path, capsys, extra, lines, message):
    path = write_answers(tmp_path, boxes=False)
    if lines is not None:
        generate_per_task(1, seed=0, tasks=["Describe"])[0].load_image().save(tmp_path / "a.png")
        path.write_text("\n".join(lines) + "\n")
    assert main([*RUN, "--data", str(path), "--out", str(tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1


def test_a_missing_file_is_refused(tmp_path, capsys):
    assert main([*RUN, "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)]) == 2
    assert "none.jsonl is not a file: give a JSONL file" in capsys.readouterr().err


class FirstOfTwo(Ranks):
    """Rank 0 of a torchrun of two, without a process group (the refusal comes first)."""

    def from_main(self, value):
        return value


def test_torchrun_is_refused_saying_to_use_shards(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(study, "init_ranks", lambda device: FirstOfTwo(0, 2))
    path = write_answers(tmp_path)
    assert main([*RUN, "--data", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "does not run under torchrun" in err and "--shard K/N" in err
    assert "mmlens merge" in err and err.count("error:") == 1
