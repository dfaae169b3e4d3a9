"""The ``mmlens`` command end to end: flow, report, hooks, and its refusals."""

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from mmlens import HookedMultimodalTransformer
from mmlens.cli import main
from mmlens.experiments import sweep
from mmlens.zoo.build import build_config, build_processor

SECTIONS = ("Flows to the last position", "Image to question",
            "Related vs other image patches to the question", "Every flow per task",
            "Answer emergence")



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small random model with the shapes-llava tokenizer and processor, saved to disk."""
    folder = tmp_path_factory.mktemp("model")
    processor = build_processor(56)
    config = build_config(len(processor.tokenizer), image_size=56, vision_layers=2,
                          text_layers=4, width=32)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def finished_run(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = main(["flow", "--model", model_dir, "--per-task", "2", "--no-filter", "--quiet",
                 "--tasks", "ChooseAttr,LogicalObj,QueryAttr", "--out", str(out)])
    assert code == 0
    return out


def test_flow_writes_tables_and_a_self_contained_report(finished_run):
    flow = pd.read_csv(finished_run / "flow.csv")
    assert set(flow.task) == {"ChooseAttr", "LogicalObj", "QueryAttr"}
    assert flow.groupby("flow").layer.nunique().eq(4).all() and flow.flow.nunique() == 6
    assert set(pd.read_csv(finished_run / "dropped.csv").columns) == {
        "example_id", "task", "flow", "reason"}
    emergence = pd.read_csv(finished_run / "emergence.csv")
    assert {"lower", "capitalised"} <= set(emergence.variant)
    run = json.loads((finished_run / "run.json").read_text())
    assert run["window"] == 1 and run["n_examples"] == 6
    page = (finished_run / "report.html").read_text()
    assert all(section in page for section in SECTIONS)
    assert "Plotly.newPlot" in page and "<script src=" not in page  # plotly inlined


def test_device_map_and_automatic_batch_give_the_same_rows(model_dir, finished_run, tmp_path):
    code = main(["flow", "--model", model_dir, "--per-task", "2", "--no-filter", "--quiet",
                 "--tasks", "ChooseAttr,LogicalObj,QueryAttr", "--out", str(tmp_path),
                 "--device-map", "vision=cpu,blocks.0-1=cpu,blocks.2-3=cpu,unembed=cpu",
                 "--batch-size", "auto", "--max-memory", "1MB"])
    assert code == 0
    before, after = pd.read_csv(finished_run / "flow.csv"), pd.read_csv(tmp_path / "flow.csv")
    assert before.drop(columns=["p_block", "rel_change"]).equals(
        after.drop(columns=["p_block", "rel_change"]))
    assert (before.p_block - after.p_block).abs().max() < 1e-6


def test_report_is_rebuilt_from_saved_tables(finished_run, capsys):
    (finished_run / "report.html").unlink()
    assert main(["report", str(finished_run)]) == 0
    assert all(section in (finished_run / "report.html").read_text() for section in SECTIONS)
    assert main(["report", str(finished_run / "nothing")]) == 2
    assert "lacks flow.csv" in capsys.readouterr().err


def test_rerun_resumes_from_the_store(finished_run, model_dir, monkeypatch):
    before = pd.read_csv(finished_run / "flow.csv")
    monkeypatch.setattr(sweep, "clean_run", _no_compute)
    assert main(["flow", "--model", model_dir, "--per-task", "2", "--no-filter", "--quiet",
                 "--tasks", "ChooseAttr,LogicalObj,QueryAttr", "--out", str(finished_run)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(finished_run / "flow.csv"), before)


def _no_compute(*args, **kwargs):
    raise AssertionError("the model ran before the inputs were checked")


@pytest.mark.parametrize("arguments, message", [
    (["--data", "{tmp}"], "is not a GQA folder"),
    (["--data", "{tmp}/missing"], "neither 'shapes' nor an existing folder"),
    (["--tasks", "ChooseAttr,Counting"], "unknown task"),
    (["--flows", "image->answer"], "unknown span 'answer'"),
    (["--flows", "image"], "SOURCE->TARGET"),
    (["--window", "5"], "larger than the model's 4 layers"),
    (["--per-task", "0"], "positive integer"),
    (["--device-map", "vision:cpu"], "write 'auto' or part=device pairs"),
    (["--device-map", "decoder=cpu"], "'decoder' is not a part of this model"),
    (["--max-memory", "12 parsecs"], "memory '12 parsecs' is not understood"),
])
def test_bad_inputs_fail_before_compute(model_dir, tmp_path, monkeypatch, capsys, arguments,
                                        message):
    monkeypatch.setattr(sweep, "clean_run", _no_compute)
    arguments = [a.replace("{tmp}", str(tmp_path)) for a in arguments]
    code = main(["flow", "--model", model_dir, "--per-task", "1", "--quiet",
                 "--out", str(tmp_path / "out"), *arguments])
    assert code == 2
    assert message in capsys.readouterr().err


def test_data_errors_come_before_loading_the_model(tmp_path, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(HookedMultimodalTransformer, "from_pretrained", no_loading)
    assert main(["flow", "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "is not a GQA folder" in capsys.readouterr().err


def test_hooks_lists_names_and_shapes(model_dir, capsys):
    assert main(["hooks", "--model", model_dir]) == 0
    lines = capsys.readouterr().out.splitlines()
    mask = next(line for line in lines if line.startswith("blocks.0.attn.hook_mask "))
    assert mask.split(None, 1)[1].startswith("[1, 1, ")
    assert any(line.startswith("vision.blocks.0.attn.hook_pattern ") for line in lines)


def _bundled_model_present() -> bool:
    from mmlens.zoo import BUNDLED

    return (BUNDLED["shapes-llava"] / "config.json").is_file()


@pytest.mark.skipif(not _bundled_model_present(), reason="shapes-llava is not bundled here")
def test_the_default_study_on_shapes_llava(tmp_path):
    """What `mmlens flow` does with its defaults, on fewer questions, as a user runs it."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "mmlens.cli", "flow", "--per-task", "4", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "information flow" in done.stderr  # the progress bar
    flow = pd.read_csv(out / "flow.csv")
    dropped = pd.read_csv(out / "dropped.csv")
    run = json.loads((out / "run.json").read_text())
    assert run["window"] == 3 and run["n_layers"] == 8 and run["n_examples"] == 24
    assert flow.example_id.nunique() == run["n_kept"] > 0
    wrong = dropped[dropped.flow == "all"]
    assert wrong.reason.str.startswith("wrong answer").all()
    assert not set(wrong.example_id) & set(flow.example_id)
    assert flow.answer.str[0].str.isupper().all()  # shapes-llava answers "Yes", "Red"...
    emergence = pd.read_csv(out / "emergence.csv")
    final = emergence[(emergence.layer == 7) & (emergence.reading == "final_norm")
                      & (emergence.variant == "capitalised")]
    assert (final["rank"] == 1).all()  # the model's own answer at its output
    assert "Answer emergence" in (out / "report.html").read_text()
