"""Loading real GQA files: task mapping, object boxes, wrong options, sampling and errors.

The fixture ``gqa_mini`` holds ten hand-written questions on two images; only ``1001.png`` is
on disk, so image 1002 shows the default path of a missing image.
"""

import json
import shutil
from pathlib import Path

import pytest

from mmlens.data.example import TASKS
from mmlens.data.gqa import (
    DETAILED_TYPE_TO_TASK,
    is_gqa_folder,
    load_gqa,
    sample_per_task,
    wrong_option_from_question,
)

MINI = Path(__file__).parents[1] / "fixtures" / "gqa_mini"


@pytest.fixture(scope="module")
def mini():
    return {ex.example_id: ex for ex in load_gqa(MINI)}


def write_gqa(folder: Path, questions: dict, graphs: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "questions.json").write_text(json.dumps(questions))
    (folder / "sceneGraphs.json").write_text(json.dumps(graphs))
    return folder


def one_object_gqa(n: int, detailed: str = "chooseAttr") -> tuple[dict, dict]:
    questions = {
        f"{i:03d}": {
            "imageId": "7",
            "question": "Is the jar full or empty?",
            "answer": "empty",
            "types": {"detailed": detailed},
            "annotations": {"question": {"2": "1"}},
        }
        for i in range(n)
    }
    graphs = {"7": {"width": 4, "height": 4, "objects": {"1": {"x": 0, "y": 0, "w": 2, "h": 2}}}}
    return questions, graphs


def test_types_map_to_the_six_tasks_and_others_are_skipped(mini):
    assert set(DETAILED_TYPE_TO_TASK.values()) == set(TASKS)
    assert sorted(mini) == [f"q0{i}" for i in range(1, 10)]  # q10 is a colorQuery
    tasks = [ex.task for ex in load_gqa(MINI)]
    assert tasks == sorted(tasks, key=TASKS.index)
    assert {ex.task for ex in mini.values()} == set(TASKS)


def test_central_object_boxes(mini):
    assert mini["q01"].boxes == [(1.0, 2.0, 3.0, 4.0)]
    assert mini["q03"].boxes == [(8.0, 0.0, 2.0, 2.0)]
    assert mini["q08"].boxes == [(1.0, 3.0, 2.0, 2.5)]
    # no program: annotations in question order ("5:7" comes before "10")
    assert mini["q09"].boxes == [(1.0, 3.0, 2.0, 2.5)]
    assert mini["q02"].boxes == [(0.0, 5.0, 12.0, 3.0)]


def test_two_object_boxes_follow_the_program(mini):
    jar, cup = (1.0, 2.0, 3.0, 4.0), (6.0, 3.0, 2.0, 2.0)
    assert mini["q04"].boxes == [jar, cup]  # object 1 is the reference, object 2 the subject
    assert mini["q05"].boxes == [jar, cup]
    assert mini["q06"].boxes == [(0.0, 8.0, 8.0, 4.0)]  # the mud is not in the image
    assert mini["q07"].boxes == [(1.0, 3.0, 2.0, 2.5), (5.0, 3.0, 2.0, 2.0)]  # through relate


def test_wrong_answers_of_choose_questions(mini):
    assert mini["q01"].wrong_answer == "full"  # from the program
    assert mini["q02"].wrong_answer == "wooden"  # from the question
    assert mini["q03"].wrong_answer == "cat"
    assert mini["q04"].wrong_answer == "left"
    assert all(mini[q].wrong_answer is None for q in ("q05", "q06", "q07", "q08", "q09"))


@pytest.mark.parametrize(
    "question, answer, wrong",
    [
        ("Is the jar full or empty?", "full", "empty"),
        ("Which kind of animal is this, a cat or a bird?", "bird", "cat"),
        ("Is this a coffee maker or a toaster?", "toaster", "coffee maker"),
        ("Is the faucet to the right or to the left of the toilet?", "left", "right"),
        ("Is the faucet to the right or to the left of the toilet?", "right", "left"),
        ("Is the car in front or behind the truck?", "front", "behind"),
        ("Is the glove colorful or is it black and white?", "colorful", "black and white"),
        ("Is the shirt sleeveless or short sleeved?", "short sleeved", "sleeveless"),
        ("Is the shirt short sleeved or long sleeved?", "long sleeved", "short sleeved"),
        ("Is the ground dry or maybe wet?", "wet", "dry"),
        ("What color is the jar?", "brown", None),
        ("Is the jar red or blue?", "green", None),
    ],
)
def test_wrong_option_from_question(question, answer, wrong):
    assert wrong_option_from_question(question, answer) == wrong


def test_image_paths_are_set_and_images_not_opened(mini):
    assert mini["q01"].image_path == MINI / "images" / "1001.png"
    assert mini["q06"].image_path == MINI / "images" / "1002.jpg"
    assert all(ex.image is None for ex in mini.values())
    assert mini["q01"].load_image().size == (12, 8)


def test_tasks_filter_and_unknown_task():
    assert [ex.example_id for ex in load_gqa(MINI, tasks=["LogicalObj"])] == ["q06", "q07"]
    assert [ex.task for ex in load_gqa(MINI, tasks="QueryAttr")] == ["QueryAttr"] * 2
    with pytest.raises(ValueError, match="unknown task.*ChooseAttr"):
        load_gqa(MINI, tasks=["Counting"])


def test_sampling_is_reproducible_and_per_task(tmp_path):
    questions, graphs = one_object_gqa(30)
    questions.update(
        {
            f"p{k}": {**q, "types": {"detailed": "positionQuery"}}
            for k, q in one_object_gqa(5)[0].items()
        }
    )
    root = write_gqa(tmp_path, questions, graphs)
    first = load_gqa(root, n_per_task=4, seed=3)
    assert [ex.example_id for ex in first] == [
        ex.example_id for ex in load_gqa(root, n_per_task=4, seed=3)
    ]
    ids = [ex.example_id for ex in first if ex.task == "ChooseAttr"]
    assert len(ids) == 4 and ids == sorted(ids)
    alone = load_gqa(root, tasks=["ChooseAttr"], n_per_task=4, seed=3)
    assert [ex.example_id for ex in alone] == ids
    assert ids != [
        ex.example_id for ex in load_gqa(root, tasks=["ChooseAttr"], n_per_task=4, seed=4)
    ]
    assert len(load_gqa(root, n_per_task=100)) == 35
    with pytest.raises(ValueError, match="n_per_task"):
        sample_per_task(first, n_per_task=0)


def test_gqa_layout_and_file_argument(tmp_path):
    questions, graphs = one_object_gqa(2)
    (tmp_path / "questions1.2").mkdir()
    (tmp_path / "sceneGraphs").mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / "questions1.2" / "val_balanced_questions.json").write_text(json.dumps(questions))
    (tmp_path / "questions1.2" / "testdev_balanced_questions.json").write_text("{}")
    (tmp_path / "sceneGraphs" / "val_sceneGraphs.json").write_text(json.dumps(graphs))
    assert is_gqa_folder(tmp_path)
    examples = load_gqa(tmp_path)
    assert len(examples) == 2 and examples[0].image_path == tmp_path / "images" / "7.jpg"
    assert load_gqa(tmp_path, questions="questions1.2/testdev_balanced_questions.json") == []
    by_file = load_gqa(
        tmp_path / "questions1.2" / "val_balanced_questions.json",
        scene_graphs=tmp_path / "sceneGraphs" / "val_sceneGraphs.json",
    )
    assert [ex.example_id for ex in by_file] == ["000", "001"]


def test_not_a_gqa_folder(tmp_path):
    assert not is_gqa_folder(tmp_path)
    assert not is_gqa_folder(MINI / "questions.json")
    with pytest.raises(FileNotFoundError, match=r"not a GQA folder.*questions\.json"):
        load_gqa(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_gqa(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda q, g: q["000"].pop("imageId"),
            "questions.json: question '000' has no field 'imageId'",
        ),
        (lambda q, g: q["000"].pop("types"), "questions.json: question '000' has no field 'types'"),
        (lambda q, g: g.pop("7"), "sceneGraphs.json: no scene graph for image '7'"),
        (lambda q, g: g["7"]["objects"].pop("1"), "sceneGraphs.json: image '7' has no object '1'"),
        (
            lambda q, g: g["7"]["objects"]["1"].pop("w"),
            "sceneGraphs.json: object '7/1' has no field 'w'",
        ),
    ],
)
def test_malformed_files_name_file_and_field(tmp_path, edit, message):
    questions, graphs = one_object_gqa(1)
    edit(questions, graphs)
    with pytest.raises(ValueError, match=message):
        load_gqa(write_gqa(tmp_path, questions, graphs))


def test_broken_json_and_several_candidates(tmp_path):
    shutil.copytree(MINI, tmp_path / "gqa")
    (tmp_path / "gqa" / "questions.json").write_text('{"q01": ')
    with pytest.raises(ValueError, match="questions.json: not valid JSON"):
        load_gqa(tmp_path / "gqa")
    (tmp_path / "gqa" / "questions.json").unlink()
    (tmp_path / "gqa" / "a_questions.json").write_text("{}")
    (tmp_path / "gqa" / "b_questions.json").write_text("{}")
    with pytest.raises(ValueError, match="several questions files"):
        load_gqa(tmp_path / "gqa")


def test_round_trip_through_shapes_export(tmp_path):
    shapes = pytest.importorskip("mmlens.data.shapes")
    examples = shapes.generate(24, seed=5)
    loaded = {ex.example_id: ex for ex in load_gqa(shapes.export_gqa(examples, tmp_path))}
    assert sorted(loaded) == sorted(ex.example_id for ex in examples)
    for ex in examples:
        got = loaded[ex.example_id]
        assert (got.question, got.answer, got.task, got.image_id) == (
            ex.question,
            ex.answer,
            ex.task,
            ex.image_id,
        )
        assert got.boxes == [tuple(float(v) for v in box) for box in ex.boxes]
        assert got.wrong_answer == ex.wrong_answer
        assert got.load_image().size == ex.load_image().size
