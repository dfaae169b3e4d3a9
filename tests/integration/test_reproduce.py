"""`mmlens reproduce` end to end on the bundled model, with subsets in the paper's CSV format."""

import csv
import json

import pandas as pd
import pytest

from mmlens.cli import main
from mmlens.data.gqa import CENTRAL_OBJECT_TASKS, GQA_TYPES
from mmlens.data.shapes import generate_per_task
from mmlens.zoo.registry import BUNDLED

pytestmark = pytest.mark.skipif(not (BUNDLED["shapes-llava"] / "config.json").is_file(),
                                reason="the bundled shapes-llava model is not installed")
FILE_TAG = {"ChooseAttr": "choose", "ChooseCat": "categoryThatThisChoose_objThisChoose",
            "ChooseRel": "relChooser", "CompareAttr": "twoCommon",
            "LogicalObj": "existThatOr", "QueryAttr": "positionQuery"}


def write_paper_subsets(folder, images, examples):
    """One CSV per task in the authors' layout; images saved as {img_id}.jpg."""
    folder.mkdir()
    images.mkdir()
    by_task = {}
    for number, example in enumerate(examples):
        img_id = str(2_000_000 + number)
        example.image.save(images / f"{img_id}.jpg", quality=95)
        row = {"question_id": f"{number:08d}", "img_id": img_id, "question": example.question,
               "answer": example.answer, "true option": example.answer,
               "false option": example.wrong_answer or "-",
               "type_detailed": GQA_TYPES[example.task][0], "image_w": example.image.width,
               "image_h": example.image.height}
        prefixes = (["central object"] if example.task in CENTRAL_OBJECT_TASKS
                    else ["object1", "object2"])
        for index, prefix in enumerate(prefixes):
            box = example.boxes[index] if index < len(example.boxes) else ("-",) * 4
            row.update({f"{prefix} {k}": v for k, v in zip("xywh", box, strict=True)})
        by_task.setdefault(example.task, []).append(row)
    for task, rows in by_task.items():
        path = folder / f"GQA_val_correct_question_with_{FILE_TAG[task]}_{task}.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def test_reproduce_end_to_end(tmp_path):
    subsets, images, out = tmp_path / "subsets", tmp_path / "images", tmp_path / "run"
    write_paper_subsets(subsets, images, generate_per_task(3, seed=77))
    args = ["reproduce", "--model", "shapes-llava", "--gqa-images", str(images),
            "--subsets", str(subsets), "--out", str(out), "--quiet"]
    assert main(args) == 0
    flow = pd.read_csv(out / "flow.csv")
    summary = pd.read_csv(out / "summary.csv")
    assert set(flow.flow) <= {"image->question", "image->last", "question->last", "last->last",
                              "related->question", "other->question"}
    assert {"task", "flow", "peak_layer", "peak_change", "half_start", "half_end"} <= set(
        summary.columns)
    assert (out / "report.html").is_file()
    first = len(flow)
    assert main(args) == 0  # resumes: nothing recomputed, nothing duplicated
    assert len(pd.read_csv(out / "flow.csv")) == first
    split = tmp_path / "split"  # a device map and an automatic batch: the same rows
    assert main([*args[:-3], "--out", str(split), "--quiet", "--device-map", "auto",
                 "--batch-size", "auto", "--max-memory", "64MiB"]) == 0
    again = pd.read_csv(split / "flow.csv")
    assert again.drop(columns=["p_block", "rel_change"]).equals(
        flow.drop(columns=["p_block", "rel_change"]))
    assert (again.p_block - flow.p_block).abs().max() < 1e-6


def test_reproduce_names_missing_images_before_compute(tmp_path, capsys):
    subsets, images = tmp_path / "subsets", tmp_path / "images"
    write_paper_subsets(subsets, images, generate_per_task(1, seed=5))
    next(images.iterdir()).unlink()
    code = main(["reproduce", "--model", "shapes-llava", "--gqa-images", str(images),
                 "--subsets", str(subsets), "--out", str(tmp_path / "run")])
    assert code == 2
    assert "images are missing" in capsys.readouterr().err


def test_reproduce_rejects_a_folder_without_subsets(tmp_path, capsys):
    code = main(["reproduce", "--model", "shapes-llava", "--gqa-images", str(tmp_path),
                 "--subsets", str(tmp_path), "--out", str(tmp_path / "run")])
    assert code == 2
    assert "none of the paper's subset files" in capsys.readouterr().err


def test_reproduce_with_a_preset_and_no_filter(tmp_path):
    subsets, images, out = tmp_path / "subsets", tmp_path / "images", tmp_path / "run"
    write_paper_subsets(subsets, images, generate_per_task(2, seed=5))
    args = ["reproduce", "--model", "shapes-llava", "--gqa-images", str(images),
            "--subsets", str(subsets), "--out", str(out), "--quiet", "--no-filter",
            "--preset", "llava-hf/llava-1.5-13b-hf", "--tasks", "ChooseAttr,QueryAttr"]
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["preset"] == "llava-hf/llava-1.5-13b-hf" and run["window"] == 8  # 9 > 8 layers
    assert run["arguments"]["only_correct"] is False and run["n_dropped"] == 0
    lines = (out / "examples.jsonl").read_text().splitlines()
    assert all(json.loads(line)["kept"] for line in lines) and len(lines) == run["n_examples"]


def test_reproduce_refuses_changing_a_paper_setting(tmp_path, capsys):
    args = ["reproduce", "--model", "shapes-llava", "--gqa-images", str(tmp_path),
            "--subsets", str(tmp_path), "--out", str(tmp_path / "r"),
            "--related-rule", "geometry"]
    assert main(args) == 2
    assert "use `mmlens flow` with --preset" in capsys.readouterr().err


def test_reproduce_takes_no_word_maps_and_a_tuned_lens(tmp_path):
    """The two flags reach the study as under `mmlens flow`: the views' word maps skipped,
    the lens's digest in run.json and its reading in emergence.csv."""
    from mmlens import HookedMultimodalTransformer
    from mmlens.methods.tuned_lens import TunedLens, load_tuned_lens, model_name

    subsets, images, out = tmp_path / "subsets", tmp_path / "images", tmp_path / "run"
    write_paper_subsets(subsets, images, generate_per_task(1, seed=5, tasks=["QueryAttr"]))
    model = HookedMultimodalTransformer.from_pretrained("shapes-llava")
    lens = TunedLens(model.cfg.n_layers, model.cfg.d_model, {"model": model_name(model)})
    folder = lens.save(tmp_path / "lens")
    assert main(["reproduce", "--model", "shapes-llava", "--gqa-images", str(images),
                 "--subsets", str(subsets), "--out", str(out), "--quiet", "--no-filter",
                 "--no-word-maps", "--tuned-lens", str(folder)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["word_maps"] is False and run["arguments"]["word_maps"] is False
    assert run["tuned_lens"] == load_tuned_lens(folder, model).digest
    assert run["arguments"]["tuned_lens"] == str(folder)
    view = json.loads((out / "views.json").read_text())[0]
    assert view["word_maps_skipped"] and "word_maps" not in view
    assert "tuned" in set(pd.read_csv(out / "emergence.csv")["reading"])
