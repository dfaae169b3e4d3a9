"""``mmlens tuned-lens`` and ``mmlens flow --tuned-lens`` / ``--no-word-maps``: the lens made
by the command is the one the study reads (its tuned emergence rows equal answer_emergence
with that lens), its digest is in run.json and the signature (another lens, or none, refuses
a resume naming it; a lens for another model is refused); the word maps change no row, so a
resume may switch them, and the report says when they were not computed; every map and curve
in the views equals causal_map and flow.csv computed independently."""

import json

import pandas as pd
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from mmlens import HookedMultimodalTransformer
from mmlens.cli import main
from mmlens.data.shapes import generate_per_task
from mmlens.experiments import sweep
from mmlens.experiments.emergence import answer_emergence
from mmlens.experiments.report.word_picker import NOT_COMPUTED
from mmlens.inputs.prepare import prepare
from mmlens.methods import causal_map, window_layers
from mmlens.methods.tuned_lens import TunedLens, load_tuned_lens
from mmlens.zoo.build import build_config, build_processor

TASKS = ["--per-task", "1", "--no-filter", "--quiet", "--tasks", "QueryAttr"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    processor = build_processor(56)
    config = build_config(len(processor.tokenizer), image_size=56, vision_layers=2,
                          text_layers=4, width=32)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def lens_dir(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lens")
    assert main(["tuned-lens", "--model", model_dir, "--out", str(folder), "--steps", "40",
                 "--per-task", "1", "--lr", "3e-3"]) == 0
    return folder


def test_the_command_trains_a_lens_closer_to_the_output(lens_dir, capsys):
    meta = json.loads((lens_dir / "tuned_lens.json").read_text())
    kl = meta["held_out_kl"]
    inner = slice(0, -1)
    assert sum(kl["tuned"][inner]) < sum(kl["logit"][inner])
    assert meta["training"]["steps"] == 40 and meta["training"]["per_task"] == 1


def test_flow_reads_the_tuned_lens_and_signs_with_it(model_dir, lens_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["flow", "--model", model_dir, *TASKS, "--tuned-lens", str(lens_dir),
                 "--out", str(out)]) == 0
    model = HookedMultimodalTransformer.from_pretrained(model_dir)
    lens = load_tuned_lens(lens_dir, model)
    run = json.loads((out / "run.json").read_text())
    assert run["tuned_lens"] == lens.digest and run["arguments"]["tuned_lens"] == str(lens_dir)
    assert json.loads((out / "flow.jsonl").read_text().splitlines()[0])[
        "signature"]["tuned_lens"] == lens.digest
    emergence = pd.read_csv(out / "emergence.csv")
    expected = answer_emergence(model, generate_per_task(1, seed=0, tasks=["QueryAttr"]),
                                only_correct=False, progress=False, tuned_lens=lens)
    tuned = emergence[emergence["reading"] == "tuned"].reset_index(drop=True)
    assert len(tuned) == 4 * emergence["variant"].nunique()
    want = expected[expected["reading"] == "tuned"].reset_index(drop=True)
    pd.testing.assert_series_equal(tuned["prob"], want["prob"], atol=1e-6)
    assert not tuned["prob"].equals(emergence[emergence["reading"] == "final_norm"]
                                    .reset_index(drop=True)["prob"])
    page = (out / "report.html").read_text()
    assert "the tuned lens beside the logit lens" in page
    assert "through the tuned lens it peaks at layer" in page

    # another lens (or none) refuses the resume, naming the lens's entry
    other = TunedLens(4, 32, {"model": lens.metadata["model"]}).save(tmp_path / "other")
    for extra in (["--tuned-lens", str(other)], []):
        capsys.readouterr()
        assert main(["flow", "--model", model_dir, *TASKS, *extra, "--out", str(out)]) == 2
        assert f"tuned_lens: stored '{lens.digest}'" in capsys.readouterr().err


def test_a_lens_for_another_model_is_refused(model_dir, tmp_path, capsys, monkeypatch):
    folder = TunedLens(4, 32, {"model": "another-model"}).save(tmp_path / "lens")
    monkeypatch.setattr(sweep, "clean_run", _no_compute)
    assert main(["flow", "--model", model_dir, *TASKS, "--tuned-lens", str(folder),
                 "--out", str(tmp_path / "run")]) == 2
    assert "was trained for {'model': 'another-model'}" in capsys.readouterr().err


def test_bad_lens_training_settings_are_refused(model_dir, tmp_path, capsys):
    assert main(["tuned-lens", "--model", model_dir, "--out", str(tmp_path),
                 "--steps", "0", "--per-task", "1"]) == 2
    assert "steps and items_per_step must be at least 1" in capsys.readouterr().err


def _no_compute(*args, **kwargs):
    raise AssertionError("a row was computed")


def test_word_maps_can_be_skipped_and_added_on_resume(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert main(["flow", "--model", model_dir, *TASKS, "--no-word-maps",
                 "--out", str(out)]) == 0
    view = json.loads((out / "views.json").read_text())[0]
    assert view["word_maps_skipped"] and "word_maps" not in view and view["flows"]
    run = json.loads((out / "run.json").read_text())
    assert run["word_maps"] is False and run["arguments"]["word_maps"] is False
    page = (out / "report.html").read_text()
    assert NOT_COMPUTED.replace("'", "&#x27;") in page and "class='flow'" in page
    rows = pd.read_csv(out / "flow.csv")
    # no row depends on the maps: the resume computes none and adds the maps
    monkeypatch.setattr(sweep, "clean_run", _no_compute)
    assert main(["flow", "--model", model_dir, *TASKS, "--out", str(out)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "flow.csv"), rows)
    view = json.loads((out / "views.json").read_text())[0]
    assert view["word_maps"] and "word_maps_skipped" not in view
    assert json.loads((out / "run.json").read_text())["word_maps"] is True
    assert NOT_COMPUTED.replace("'", "&#x27;") not in (out / "report.html").read_text()
    check_every_map_and_curve(model_dir, out, rows)


def check_every_map_and_curve(model_dir, out, table):
    """Each flow's curve is the example's rows of flow.csv, its window centred at their
    minimum; each word's map in each window equals causal_map over the view's grid."""
    view = json.loads((out / "views.json").read_text())[0]
    window = json.loads((out / "run.json").read_text())["window"]
    mine = table[table["example_id"].astype(str) == view["example_id"]]
    names = [name for name in dict.fromkeys(table["flow"]) if not name.startswith("random_")]
    assert [flow["name"] for flow in view["flows"]] == names
    windows = []
    for flow in view["flows"]:
        rows = mine[mine["flow"] == flow["name"]].sort_values("layer")
        assert flow["centres"] == rows["layer"].tolist()
        assert flow["values"] == pytest.approx(rows["rel_change"].tolist(), abs=1e-6)
        centre = int(rows.loc[rows["rel_change"].idxmin(), "layer"])
        assert flow["centre"] == centre and flow["layers"] == window_layers(centre, window, 4)
        windows += [flow["layers"]] if flow["layers"] not in windows else []
    model = HookedMultimodalTransformer.from_pretrained(model_dir)
    record = next(e for e in generate_per_task(1, seed=0, tasks=["QueryAttr"])
                  if str(e.example_id) == view["example_id"])
    image = record.load_image()
    batch = prepare(model, [image], [record.question], boxes=[record.boxes_for(image.size)])
    maps = view["word_maps"]
    n_words = len(maps) // len(windows)
    assert len(maps) == n_words * len(windows) and maps[n_words - 1]["word"] == "last position"
    for index, entry in enumerate(maps):
        assert entry["layers"] == windows[index // n_words]
        dst = "last" if entry["span"] == "last" else [entry["positions"]]
        frame = causal_map(model, batch, dst=dst, layers=entry["layers"], images=[image])
        grid = frame[frame["tile"] == 0].sort_values(["row", "col"])
        assert entry["values"] == pytest.approx(grid["value"].tolist(), abs=2e-6)
