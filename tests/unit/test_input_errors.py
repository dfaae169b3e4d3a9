"""Bad data files and records are refused with a message naming the file, row or example."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mmlens.core.errors import MMLensError
from mmlens.data.example import BoxOutsideImageError, Example
from mmlens.data.gqa import load_gqa
from mmlens.data.paper_subsets import PaperSubsetError, load_paper_subsets
from mmlens.experiments.study import load_examples
from mmlens.experiments.tables import all_dropped_message

FIXTURES = Path(__file__).parents[1] / "fixtures"
SUBSETS, GQA = FIXTURES / "paper_subsets_mini", FIXTURES / "gqa_mini"
CHOOSE_ATTR = "GQA_val_correct_question_with_choose_ChooseAttr.csv"


def _ids(examples):
    return [(e.example_id, e.question, e.answer, tuple(e.boxes)) for e in examples]


def _set_cell(path: Path, column: str, value: str) -> None:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    rows[0][column] = value
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_truncated_image_names_file_and_example(tmp_path):
    path = tmp_path / "2000001.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    example = Example("q7", "What?", "red", "QueryAttr", "2000001", image_path=path)
    with pytest.raises(MMLensError, match=r"cannot read the image .*2000001\.png \(example 'q7'\)"
                       r".*truncated or not an image"):
        example.load_image()
    assert path.read_bytes() == data[: len(data) // 2]  # the file is left as it was


def test_csv_with_byte_order_mark_reads_like_without(tmp_path):
    folder = Path(shutil.copytree(SUBSETS, tmp_path / "subsets"))
    path = folder / CHOOSE_ATTR
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert _ids(load_paper_subsets(folder, None)) == _ids(load_paper_subsets(SUBSETS, None))


def test_csv_that_is_not_utf8_names_the_file(tmp_path):
    folder = Path(shutil.copytree(SUBSETS, tmp_path / "subsets"))
    path = folder / CHOOSE_ATTR
    path.write_bytes(path.read_bytes().replace(b"Is the mug", b"Is the m\xfcg"))
    with pytest.raises(PaperSubsetError, match=rf"{CHOOSE_ATTR}: not UTF-8 text .*save the file "
                       "as UTF-8"):
        load_paper_subsets(folder, None)


@pytest.mark.parametrize("column, value, message", [
    ("central object w", "nan", r"column\(s\) \['central object w'\]: not a finite number"),
    ("central object x", "inf", r"column\(s\) \['central object x'\]: not a finite number"),
    ("central object x", "-3", "columns 'central object x'/'central object y': negative position"),
    ("central object h", "-1", "columns 'central object w'/'central object h': negative size"),
])
def test_csv_box_that_is_not_a_box_names_the_row(tmp_path, column, value, message):
    folder = Path(shutil.copytree(SUBSETS, tmp_path / "subsets"))
    _set_cell(folder / CHOOSE_ATTR, column, value)
    with pytest.raises(PaperSubsetError, match=rf"{CHOOSE_ATTR} row 1 \(line 2\), {message}"):
        load_paper_subsets(folder, None)


def test_gqa_json_with_byte_order_mark_and_bad_encoding(tmp_path):
    folder = Path(shutil.copytree(GQA, tmp_path / "gqa"))
    questions = folder / "questions.json"
    questions.write_bytes(b"\xef\xbb\xbf" + questions.read_bytes())
    assert _ids(load_gqa(folder)) == _ids(load_gqa(GQA))
    questions.write_bytes(questions.read_bytes().replace(b"Is the jar", b"Is the j\xe4r"))
    with pytest.raises(MMLensError, match=r"questions\.json: not UTF-8 text"):
        load_gqa(folder)


def test_gqa_duplicate_question_ids_are_refused(tmp_path):
    folder = Path(shutil.copytree(GQA, tmp_path / "gqa"))
    questions = json.loads((GQA / "questions.json").read_text())
    entries = [f'"{qid}": {json.dumps(entry)}' for qid, entry in questions.items()]
    entries += [f'"q02": {json.dumps(questions["q03"])}', f'"q05": {json.dumps(questions["q01"])}']
    (folder / "questions.json").write_text("{" + ", ".join(entries) + "}")
    with pytest.raises(MMLensError, match=r"questions\.json: id\(s\) \['q02', 'q05'\] appear more "
                       "than once"):
        load_gqa(folder)


@pytest.mark.parametrize("value, message", [(float("nan"), "NaN or infinity"),
                                            (-4, "negative value")])
def test_gqa_box_that_is_not_a_box_names_the_question(tmp_path, value, message):
    folder = Path(shutil.copytree(GQA, tmp_path / "gqa"))
    graphs = json.loads((GQA / "sceneGraphs.json").read_text())
    graphs["1001"]["objects"]["11"]["w"] = value
    (folder / "sceneGraphs.json").write_text(json.dumps(graphs))
    with pytest.raises(MMLensError, match=rf"object '11' of image '1001' \(question 'q0\d'\): box "
                       rf".*{message}"):
        load_gqa(folder)


def test_recorded_image_sizes_are_read():
    gqa = {e.example_id: e for e in load_gqa(GQA)}
    graphs = json.loads((GQA / "sceneGraphs.json").read_text())
    assert gqa["q01"].image_size == (graphs["1001"]["width"], graphs["1001"]["height"])
    subsets = {e.example_id: e for e in load_paper_subsets(SUBSETS, None)}
    assert subsets["0100"].image_size == (500, 375)  # the row's image_w, image_h


def _sized_example(tmp_path, size, *, rescale=False):
    path = tmp_path / f"img-{size[0]}x{size[1]}.png"
    Image.new("RGB", size, (200, 10, 10)).save(path)
    return Example("q9", "Is it red?", "yes", "ChooseAttr", "9", boxes=[(10, 20, 30, 40)],
                   image_path=path, image_size=(100, 80), rescale_boxes=rescale)


def test_image_of_another_size_than_recorded_is_refused(tmp_path):
    example = _sized_example(tmp_path, (200, 160))
    image = example.load_image()
    with pytest.raises(MMLensError, match=r"img-200x160\.png of example 'q9' is 200x160 but the "
                       r"data records 100x80 for it; rescale_boxes=True \(--rescale-boxes\)"):
        example.boxes_for(image.size)
    assert example.boxes == [(10, 20, 30, 40)]


def test_rescale_boxes_maps_boxes_when_the_aspect_ratio_matches(tmp_path):
    example = _sized_example(tmp_path, (201, 161), rescale=True)  # rounding of a 2x resize
    (x, y, w, h), = example.boxes_for(example.load_image().size)
    assert (x, y, w, h) == pytest.approx((20.1, 40.25, 60.3, 80.5))
    other = _sized_example(tmp_path, (200, 100), rescale=True)
    with pytest.raises(MMLensError, match="is 200x100 but the data records 100x80 for it; its "
                       "aspect ratio differs"):
        other.boxes_for(other.load_image().size)


def test_example_box_with_nan_is_refused_naming_the_example():
    example = Example("q3", "?", "a", "ChooseAttr", "3", boxes=[(1, 2, float("nan"), 4)])
    with pytest.raises(MMLensError, match=r"example 'q3': box \(1, 2, nan, 4\) holds NaN"):
        example.boxes_for((10, 10))


def test_task_filter_that_leaves_nothing_says_so(tmp_path):
    folder = tmp_path / "subsets"
    folder.mkdir()
    shutil.copy(SUBSETS / CHOOSE_ATTR, folder)
    (tmp_path / "images").mkdir()
    with pytest.raises(MMLensError, match=r"the task filter \['QueryAttr'\] left none of the "
                       "questions in"):
        load_examples(str(folder), tasks=["QueryAttr"], per_task=None, seed=0,
                      images=tmp_path / "images")


def test_every_example_dropped_names_the_filter(tmp_path):
    dropped = pd.DataFrame(
        [("a", "ChooseAttr", "all", "wrong answer 'red' (gold 'blue')"),
         ("b", "ChooseAttr", "all", "wrong answer 'no' (gold 'yes')"),
         ("c", "QueryAttr", "all", "span 'related' is empty")],
        columns=["example_id", "task", "flow", "reason"])
    message = all_dropped_message(dropped, 3, tmp_path)
    assert message.startswith("all 3 examples were dropped")
    assert "2 wrong answer" in message and "--no-filter" in message
    assert "1 span 'related'" in message
    assert str(tmp_path / "dropped.csv") in message


def test_box_outside_the_image_is_refused_naming_example_box_and_size():
    outside = Example("q7", "Is it red?", "yes", "ChooseAttr", "7", boxes=[(120, 10, 5, 5)])
    with pytest.raises(MMLensError, match=r"example 'q7': box \(120, 10, 5, 5\) \(x, y, w, h\) "
                       r"lies outside the 100x80 image"):
        outside.boxes_for((100, 80))
    below = Example("q8", "Is it red?", "yes", "ChooseAttr", "8", boxes=[(0, 80, 5, 5)])
    with pytest.raises(MMLensError, match=r"box \(0, 80, 5, 5\) .* outside the 100x80 image"):
        below.boxes_for((100, 80))
    # a box that overhangs the edge is kept (and clipped by the patch geometry)
    overhang = Example("q6", "Is it red?", "yes", "ChooseAttr", "6", boxes=[(90, 70, 30, 30)])
    assert overhang.boxes_for((100, 80)) == [(90.0, 70.0, 30.0, 30.0)]


def test_gqa_box_outside_its_recorded_image_loads_with_a_count_and_is_refused_when_used(
        tmp_path):
    folder = Path(shutil.copytree(GQA, tmp_path / "gqa"))
    graphs = json.loads((GQA / "sceneGraphs.json").read_text())
    graphs["1001"]["objects"]["11"]["x"] = graphs["1001"]["width"] + 3
    (folder / "sceneGraphs.json").write_text(json.dumps(graphs))
    with pytest.warns(UserWarning, match=r"sceneGraphs.json: \d+ example\(s\) have a box "
                      r"outside their recorded image .*dropped.csv"):
        examples = load_gqa(folder)
    hit = [ex for ex in examples if ex.image_id == "1001" and (15, 2, 3, 4) in ex.boxes]
    assert hit, "the example still loads, so the data stays complete"
    with pytest.raises(BoxOutsideImageError, match=r"box \(15.0, 2.0, 3.0, 4.0\) .* outside "
                       r"the 12x8 image"):
        hit[0].boxes_for((12, 8))


def test_paper_subset_box_outside_its_image_loads_with_a_count_and_is_refused_when_used(
        tmp_path):
    folder = tmp_path / "subsets"
    folder.mkdir()
    shutil.copy(SUBSETS / CHOOSE_ATTR, folder)
    _set_cell(folder / CHOOSE_ATTR, "central object y", "375")
    with pytest.warns(UserWarning, match=rf"{CHOOSE_ATTR}: 1 example\(s\) have a box outside"):
        examples = load_paper_subsets(folder, tmp_path)
    outside = [ex for ex in examples if ex.boxes[0][1] == 375.0]
    assert len(outside) == 1
    with pytest.raises(BoxOutsideImageError, match=r"box \(120.0, 375.0, 60.0, 80.0\) .* "
                       r"outside the 500x375 image"):
        outside[0].boxes_for((500, 375))


@pytest.mark.parametrize("image_id", ["../secret", "a/../../secret", "/etc/hostname",
                                      "C:\\secret", "..\\secret"])
def test_image_ids_that_leave_the_images_folder_are_refused(tmp_path, image_id):
    folder = Path(shutil.copytree(GQA, tmp_path / "gqa"))
    questions = json.loads((GQA / "questions.json").read_text())
    questions["q01"]["imageId"] = image_id
    (folder / "questions.json").write_text(json.dumps(questions))
    graphs = json.loads((GQA / "sceneGraphs.json").read_text())
    graphs[image_id] = graphs["1001"]
    (folder / "sceneGraphs.json").write_text(json.dumps(graphs))
    with pytest.raises(MMLensError, match=r"questions\.json: question 'q01', field 'imageId': "
                       r"image id .* leads outside the images folder"):
        load_gqa(folder)
    subsets = tmp_path / "subsets"
    subsets.mkdir()
    shutil.copy(SUBSETS / CHOOSE_ATTR, subsets)
    _set_cell(subsets / CHOOSE_ATTR, "img_id", image_id)
    with pytest.raises(MMLensError, match=rf"{CHOOSE_ATTR} row 1 \(line 2\), column "
                       r"'img_id': image id .* leads outside the images folder"):
        load_paper_subsets(subsets, tmp_path / "images")


def test_deeply_nested_questions_json_names_the_file(tmp_path):
    folder = Path(shutil.copytree(GQA, tmp_path / "gqa"))
    (folder / "questions.json").write_text('{"q": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(MMLensError, match=r"questions\.json: JSON nested too deeply"):
        load_gqa(folder)


def test_csv_field_over_the_csv_limit_names_the_file(tmp_path):
    folder = tmp_path / "subsets"
    folder.mkdir()
    shutil.copy(SUBSETS / CHOOSE_ATTR, folder)
    _set_cell(folder / CHOOSE_ATTR, "captions", "x" * 131_073)
    with pytest.raises(PaperSubsetError, match=rf"{CHOOSE_ATTR}: cannot be read as CSV, .*field "
                       r"limit.* up to 131072 characters\): is a quote left open\?"):
        load_paper_subsets(folder, None)


def test_gqa_annotation_spans_that_are_not_whole_numbers_name_the_question(tmp_path):
    folder = Path(shutil.copytree(GQA, tmp_path / "gqa"))
    questions = json.loads((GQA / "questions.json").read_text())
    questions["q02"]["annotations"]["question"] = {"2.5": "11"}  # q02 has no program
    (folder / "questions.json").write_text(json.dumps(questions))
    with pytest.raises(MMLensError, match=r"questions\.json: question 'q02', field "
                       r"annotations\.question: \{'2\.5': '11'\} must map token spans"):
        load_gqa(folder)
