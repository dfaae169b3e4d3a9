"""The synthetic shapes data: determinism, correct answers, tight boxes, GQA export."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from mmlens.data import TASKS
from mmlens.data.shapes import (
    ANSWERS,
    COLORS,
    QUESTION_WORDS,
    ShapeObject,
    draw_scene,
    export_gqa,
    generate,
    generate_per_task,
    object_mask,
)

N_PER_TASK = 40
WHITE = (255, 255, 255)


@pytest.fixture(scope="module")
def examples():
    return generate_per_task(N_PER_TASK, seed=11)


def _matching(objects: list[ShapeObject], phrase: str) -> list[ShapeObject]:
    """Objects a phrase like "small red circle" or "red object" describes."""
    *qualifiers, head = phrase.split()
    found = [o for o in objects if head == "object" or o.shape == head]
    return [o for o in found if all(q in (o.color, o.size) for q in qualifiers)]


def _the(objects: list[ShapeObject], phrase: str) -> ShapeObject:
    found = _matching(objects, phrase)
    assert len(found) == 1, f"{phrase!r} names {len(found)} objects"
    return found[0]


def _center_x(o: ShapeObject) -> float:
    return o.x + o.w / 2


def _recompute(question: str, objects: list[ShapeObject], size: int) -> str:
    """The answer worked out from the scene alone, re-parsing the question."""
    if m := re.fullmatch(r"Is the (.+?) to the (\w+) or to the (\w+) of the (.+)\?", question):
        a, b = _the(objects, m[1]), _the(objects, m[4])
        assert a.x + a.w <= b.x or b.x + b.w <= a.x, "objects overlap horizontally"
        return "left" if _center_x(a) < _center_x(b) else "right"
    if m := re.fullmatch(r"Is the (.+?) a (\w+) or a (\w+)\?", question):
        return _the(objects, m[1]).shape
    if m := re.fullmatch(r"Is the (.+) (\w+) or (\w+)\?", question):
        obj = _the(objects, m[1])
        return obj.color if m[2] in COLORS else obj.size
    if m := re.fullmatch(r"What do the (\w+) and the (\w+) have in common\?", question):
        a, b = _the(objects, m[1]), _the(objects, m[2])
        common = [attr for attr in ("color", "size") if getattr(a, attr) == getattr(b, attr)]
        assert len(common) == 1 and a.shape != b.shape
        return common[0]
    if m := re.fullmatch(r"Is there a (\w+ \w+) or a (\w+ \w+)\?", question):
        counts = [len(_matching(objects, p)) for p in (m[1], m[2])]
        assert max(counts) <= 1
        return "yes" if sum(counts) else "no"
    if m := re.fullmatch(r"On which side is the (.+)\?", question):
        obj = _the(objects, m[1])
        assert obj.x + obj.w <= size / 2 or obj.x >= size / 2, "object straddles the middle"
        return "left" if obj.x + obj.w <= size / 2 else "right"
    raise AssertionError(f"unparsed question {question!r}")


def test_same_seed_same_examples_and_prefix_stable():
    first, again = generate(18, seed=5), generate(18, seed=5)
    for a, b in zip(first, again, strict=True):
        assert (a.example_id, a.question, a.answer, a.boxes) == (
            b.example_id,
            b.question,
            b.answer,
            b.boxes,
        )
        assert a.image.tobytes() == b.image.tobytes()
    shorter = generate(7, seed=5)
    assert [e.example_id for e in shorter] == [e.example_id for e in first[:7]]
    only = generate(3, seed=5, tasks=["QueryAttr"])
    assert [e.question for e in only] == [e.question for e in first if e.task == "QueryAttr"]
    other = generate(18, seed=6)
    assert [e.question for e in other] != [e.question for e in first]


def test_tasks_and_answers_are_balanced(examples):
    assert Counter(e.task for e in examples) == {t: N_PER_TASK for t in TASKS}
    assert len({e.example_id for e in examples}) == len(examples)
    for task in TASKS:
        answers = Counter(e.answer for e in examples if e.task == task)
        assert set(answers) == set(ANSWERS[task])
        assert max(answers.values()) - min(answers.values()) <= 1


def test_answers_match_the_scene(examples):
    for e in examples:
        assert e.answer == e.answer.lower()
        assert _recompute(e.question, e.objects, e.image.width) == e.answer, e.question


def test_options_and_boxes_of_named_objects(examples):
    first_option = Counter()
    for e in examples:
        words = re.findall(r"\w+|[^\w\s]", e.question)
        assert set(words) <= set(QUESTION_WORDS)
        assert e.boxes == [e.objects[i].box for i in e.subjects]
        if e.task in ("ChooseAttr", "ChooseCat", "ChooseRel"):
            assert e.wrong_answer not in (None, e.answer)
            assert e.answer in words and e.wrong_answer in words
            first_option[words.index(e.answer) < words.index(e.wrong_answer)] += 1
        else:
            assert e.wrong_answer is None
        n_boxes = {"ChooseRel": {2}, "CompareAttr": {2}}.get(e.task, {1})
        if e.task == "LogicalObj":
            n_boxes = {1, 2} if e.answer == "yes" else {0}
        assert len(e.boxes) in n_boxes, e.question
    assert first_option[True] > 20 and first_option[False] > 20


def test_boxes_enclose_the_drawn_pixels(examples):
    for e in examples[::7]:
        size = e.image.width
        pixels = np.asarray(e.image)
        inside = np.zeros(pixels.shape[:2], dtype=bool)
        for obj in e.objects:
            x, y, w, h = obj.box
            assert 0 <= x and 0 <= y and x + w <= size and y + h <= size
            inside[int(y) : int(y + h), int(x) : int(x + w)] = True
            alone = (np.asarray(draw_scene([obj], size, WHITE)) != 255).any(axis=2)
            rows, cols = np.nonzero(alone)
            assert (cols.min(), rows.min()) == (x, y), "box is not tight at the top left"
            assert (cols.max() + 1, rows.max() + 1) == (x + w, y + h), "box is not tight"
        background = pixels[0, 0]
        drawn = (pixels != background).any(axis=2)
        assert not (drawn & ~inside).any(), "pixels drawn outside every box"


def test_object_mask_labels_each_drawn_pixel_with_its_object(examples):
    for e in examples[::5]:
        size = e.image.width
        mask = np.asarray(object_mask(e.objects, size))
        for k, obj in enumerate(e.objects):
            alone = (np.asarray(draw_scene([obj], size, WHITE)) != 255).any(axis=2)
            assert (alone == (mask == k + 1)).all(), f"object {k} of {e.example_id}"
        assert set(np.unique(mask)) <= set(range(len(e.objects) + 1))


def test_export_writes_gqa_files(tmp_path, examples):
    subset = examples[:: N_PER_TASK // 2]
    export_gqa(subset, tmp_path)
    questions = json.loads((tmp_path / "questions.json").read_text())
    graphs = json.loads((tmp_path / "sceneGraphs.json").read_text())
    assert set(questions) == {e.example_id for e in subset}
    details = {"chooseAttr", "categoryThisChoose", "relChooser", "twoCommon"}
    details |= {"existThatOr", "positionQuery"}
    for e in subset:
        q = questions[e.example_id]
        assert (q["imageId"], q["question"], q["answer"]) == (e.image_id, e.question, e.answer)
        assert q["types"]["detailed"] in details
        graph = graphs[e.image_id]
        assert (graph["width"], graph["height"]) == e.image.size
        assert (tmp_path / "images" / f"{e.image_id}.png").is_file()
        words = re.findall(r"\w+|[^\w\s]", e.question)
        boxes = []
        for span, object_id in q["annotations"]["question"].items():
            start, _, end = span.partition(":")
            phrase = words[int(start) : int(end or int(start) + 1)]
            obj = graph["objects"][object_id]
            assert obj["name"] in phrase or phrase[-1] == "object"
            boxes.append((obj["x"], obj["y"], obj["w"], obj["h"]))
        assert sorted(boxes) == sorted(e.boxes)
