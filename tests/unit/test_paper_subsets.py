"""The paper's subset CSVs: a hand-written fixture, malformed rows, the real files if present."""

import csv
import shutil
from collections import Counter
from pathlib import Path

import pytest

from mmlens.data.example import TASKS
from mmlens.data.paper_subsets import PaperSubsetError, load_paper_subsets, read_subset_csv

MINI = Path(__file__).parents[1] / "fixtures" / "paper_subsets_mini"
REAL = Path(__file__).parents[2] / ".." / "shared" / "data" / "paper-gqa-subsets"
IMAGES = Path("/gqa/images")


@pytest.fixture(scope="module")
def mini():
    return load_paper_subsets(MINI, IMAGES)


def by_id(examples):
    return {ex.example_id: ex for ex in examples}


def copy_mini(tmp_path: Path) -> Path:
    return Path(shutil.copytree(MINI, tmp_path / "subsets"))


def edit_cell(path: Path, row: int, column: str, value: str) -> None:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
        fields = list(rows[0])
    rows[row - 1][column] = value
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def test_every_task_file_is_read_in_task_order(mini):
    assert Counter(ex.task for ex in mini) == {
        "ChooseAttr": 2, "ChooseCat": 2, "ChooseRel": 2,
        "CompareAttr": 2, "LogicalObj": 2, "QueryAttr": 3,
    }  # fmt: skip
    assert [ex.task for ex in mini] == sorted((ex.task for ex in mini), key=TASKS.index)
    assert [ex.example_id for ex in mini][:4] == ["0100", "0101", "0200", "201"]


def test_fields_boxes_and_wrong_options(mini):
    examples = by_id(mini)
    mug = examples["0100"]
    assert (mug.question, mug.answer, mug.wrong_answer) == (
        "Is the mug red or blue?",
        "blue",
        "red",
    )
    assert mug.boxes == [(120.0, 200.0, 60.0, 80.0)]  # x, y, w, h from the four columns
    assert examples["0300"].boxes == [(300.0, 250.0, 100.0, 40.0), (120.0, 200.0, 60.0, 80.0)]
    assert examples["0300"].wrong_answer == "right"
    assert examples["0301"].wrong_answer == "behind"
    assert examples["0500"].boxes == [(0.0, 200.0, 500.0, 133.0)]  # object 2 is '-'
    assert len(examples["0501"].boxes) == 2
    assert examples["0400"].wrong_answer is None and examples["0600"].wrong_answer is None


def test_images_are_joined_by_img_id_without_opening(mini):
    ex = by_id(mini)["0200"]
    assert ex.image_id == "2000003" and ex.image_path == IMAGES / "2000003.jpg"
    assert ex.image is None
    assert all(ex.image_path is None for ex in load_paper_subsets(MINI, None))


def test_tasks_and_sampling():
    only = load_paper_subsets(MINI, IMAGES, tasks=["QueryAttr", "ChooseRel"])
    assert [ex.example_id for ex in only] == ["0300", "0301", "0600", "0601", "0602"]
    sample = load_paper_subsets(MINI, IMAGES, n_per_task=1, seed=1)
    assert len(sample) == 6
    assert sample == load_paper_subsets(MINI, IMAGES, n_per_task=1, seed=1)
    with pytest.raises(ValueError, match="unknown task"):
        load_paper_subsets(MINI, IMAGES, tasks=["Count"])


def test_a_bad_box_value_names_file_row_and_column(tmp_path):
    folder = copy_mini(tmp_path)
    edit_cell(
        folder / "GQA_val_correct_question_with_relChooser_ChooseRel.csv", 2, "object2 x", "1O0"
    )
    with pytest.raises(
        PaperSubsetError,
        match=r"ChooseRel\.csv row 2 \(line 3\), column 'object2 x': '1O0' is not a number",
    ):
        load_paper_subsets(folder, IMAGES)


def test_row_numbers_count_records_not_lines(tmp_path):
    # the first ChooseAttr row has a caption over two lines
    folder = copy_mini(tmp_path)
    path = folder / "GQA_val_correct_question_with_choose_ChooseAttr.csv"
    edit_cell(path, 2, "central object h", "tall")
    with pytest.raises(PaperSubsetError, match=r"row 2 \(line 4\), column 'central object h'"):
        read_subset_csv(path)


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("object1 y", "-", r"'object1 y': '-' is not a number \(write '-' in all four"),
        ("type_detailed", "chooseAttr", "'chooseAttr' is not a CompareAttr type"),
        ("question_id", " ", "column 'question_id': empty"),
        ("object2 w", "-3", "negative size"),
    ],
)
def test_malformed_rows(tmp_path, column, value, message):
    folder = copy_mini(tmp_path)
    edit_cell(folder / "GQA_val_correct_question_with_twoCommon_CompareAttr.csv", 1, column, value)
    with pytest.raises(PaperSubsetError, match=message):
        load_paper_subsets(folder, IMAGES)


def test_malformed_files(tmp_path):
    folder = copy_mini(tmp_path)
    shutil.copy(
        folder / "GQA_val_correct_question_with_choose_ChooseAttr.csv", folder / "extra.csv"
    )
    with pytest.raises(PaperSubsetError, match="extra.csv: cannot tell the task"):
        load_paper_subsets(folder, IMAGES)
    (folder / "extra.csv").rename(folder / "copy_ChooseAttr.csv")
    with pytest.raises(PaperSubsetError, match="question_id 0100 appears in both"):
        load_paper_subsets(folder, IMAGES)
    (folder / "copy_ChooseAttr.csv").write_text("question_id,img_id,question\n1,2,Why?\n")
    with pytest.raises(PaperSubsetError, match=r"missing column\(s\) \['answer'\]"):
        load_paper_subsets(folder, IMAGES)
    (folder / "copy_ChooseAttr.csv").write_text(
        "question_id,img_id,question,answer,central object x\n1,2,Why?,yes,3,4\n"
    )
    with pytest.raises(PaperSubsetError, match="row 1 .*number of fields"):
        load_paper_subsets(folder, IMAGES)


def test_missing_folder_or_no_csv(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_paper_subsets(tmp_path / "nowhere", IMAGES)
    with pytest.raises(FileNotFoundError, match="no .csv files"):
        load_paper_subsets(tmp_path, IMAGES)


@pytest.mark.skipif(not REAL.is_dir(), reason="the paper's subset CSVs are not in ../shared/data")
def test_real_subsets_parse_completely():
    examples = load_paper_subsets(REAL, IMAGES)
    assert len(examples) == 5525
    assert Counter(ex.task for ex in examples) == {
        "ChooseAttr": 1000, "ChooseCat": 1000, "ChooseRel": 964,
        "CompareAttr": 570, "LogicalObj": 991, "QueryAttr": 1000,
    }  # fmt: skip
    assert all(ex.boxes for ex in examples)
    two_objects = [ex for ex in examples if ex.task in ("ChooseRel", "CompareAttr")]
    assert all(len(ex.boxes) == 2 for ex in two_objects)
    choose = [ex for ex in examples if ex.task.startswith("Choose")]
    assert all(ex.wrong_answer and ex.wrong_answer != ex.answer for ex in choose)
