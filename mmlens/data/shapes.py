"""Synthetic GQA: seeded images of coloured shapes with questions of the paper's six tasks.

    >>> examples = generate(60, seed=0)            # 10 per task, same list for the same seed
    >>> examples[0].question, examples[0].answer, examples[0].boxes
    >>> export_gqa(examples, "out/")                # questions.json, sceneGraphs.json, images/

Every example is drawn from its own generator seeded by ``(seed, task, index within task)``,
so ``generate(n, seed)`` and ``generate(n, seed, tasks=[task])`` agree on the examples they
share, and a prefix of a larger call gives the same examples.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from mmlens.data.example import TASKS, Example
from mmlens.data.shapes_questions import (
    ANSWERS,
    COLORS,
    QUESTION_WORDS,
    SHAPES,
    SIZES,
    Layout,
    ShapeObject,
    ask,
)

__all__ = [
    "ANSWERS",
    "COLORS",
    "GQA_TYPES",
    "QUESTION_WORDS",
    "SHAPES",
    "SIZES",
    "ShapeObject",
    "ShapesExample",
    "draw_scene",
    "object_mask",
    "export_gqa",
    "generate",
    "generate_one",
    "generate_per_task",
]

DEFAULT_IMAGE_SIZE = 112
DEFAULT_N_OBJECTS = (3, 5)

GQA_TYPES: dict[str, dict[str, str]] = {
    "ChooseAttr": {"structural": "choose", "semantic": "attr", "detailed": "chooseAttr"},
    "ChooseCat": {"structural": "choose", "semantic": "cat", "detailed": "categoryThisChoose"},
    "ChooseRel": {"structural": "choose", "semantic": "rel", "detailed": "relChooser"},
    "CompareAttr": {"structural": "compare", "semantic": "attr", "detailed": "twoCommon"},
    "LogicalObj": {"structural": "logical", "semantic": "obj", "detailed": "existThatOr"},
    "QueryAttr": {"structural": "query", "semantic": "attr", "detailed": "positionQuery"},
}
"""GQA's question types (real GQA names) for each task."""


@dataclass
class ShapesExample(Example):
    """An ``Example`` that also keeps its scene: the drawn objects and what the question names.

    ``subjects`` index ``objects`` (the objects whose boxes are in ``boxes``); ``mentions`` pair
    each phrase of the question naming an object with that object's index.
    """

    objects: list[ShapeObject] = field(default_factory=list)
    subjects: tuple[int, ...] = ()
    mentions: tuple[tuple[str, int], ...] = ()


def draw_scene(
    objects: Sequence[ShapeObject], image_size: int, background: tuple[int, int, int]
) -> Image.Image:
    """An RGB image ``[image_size, image_size]`` with each object drawn inside its box."""
    image = Image.new("RGB", (image_size, image_size), background)
    _draw_objects(ImageDraw.Draw(image), objects, [COLORS[o.color] for o in objects])
    return image


def object_mask(objects: Sequence[ShapeObject], image_size: int) -> Image.Image:
    """An ``L`` image ``[image_size, image_size]``: pixel = 1 + index of the object drawn there.

    Background pixels are 0. The shapes are drawn exactly as ``draw_scene`` draws them.
    """
    if len(objects) > 254:
        raise ValueError(f"{len(objects)} objects do not fit an 8-bit mask: use at most 254")
    mask = Image.new("L", (image_size, image_size), 0)
    _draw_objects(ImageDraw.Draw(mask), objects, range(1, len(objects) + 1))
    return mask


def _draw_objects(draw: ImageDraw.ImageDraw, objects: Sequence[ShapeObject], fills) -> None:
    """Draw each object filled with its entry of ``fills`` (an RGB tuple or a mask value)."""
    for obj, fill in zip(objects, fills, strict=True):
        right, bottom = obj.x + obj.w - 1, obj.y + obj.h - 1
        if obj.shape == "circle":
            draw.ellipse((obj.x, obj.y, right, bottom), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((obj.x, obj.y, right, bottom), fill=fill)
        elif obj.shape == "triangle":
            apex = ((obj.x + right) / 2, obj.y)
            draw.polygon([(obj.x, bottom), (right, bottom), apex], fill=fill)
        else:
            raise ValueError(f"cannot draw shape {obj.shape!r}: use one of {SHAPES}")


def _image_id(seed: int, task: str, index: int) -> str:
    return f"shapes{seed}-{task}-{index:06d}"


def generate_one(
    task: str,
    index: int,
    seed: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    n_objects: tuple[int, int] = DEFAULT_N_OBJECTS,
) -> ShapesExample:
    """The ``index``-th ``task`` example of ``seed``; answers cycle through ``ANSWERS[task]``.

    Scenes hold ``n_objects`` (low, high) objects, or more where the question needs them.
    """
    if task not in ANSWERS:
        raise ValueError(f"unknown task {task!r}: choose from {TASKS}")
    rng = random.Random(f"mmlens-shapes/{seed}/{task}/{index}")
    answer = ANSWERS[task][index % len(ANSWERS[task])]
    objects, question = ask(task, answer, rng, Layout(image_size, *n_objects))
    gray = rng.randint(235, 255)
    image_id = _image_id(seed, task, index)
    return ShapesExample(
        example_id=f"{image_id}-q",
        question=question.text,
        answer=question.answer,
        task=task,
        image_id=image_id,
        boxes=[objects[i].box for i in question.subjects],
        wrong_answer=question.wrong_answer,
        image=draw_scene(objects, image_size, (gray, gray, gray)),
        objects=objects,
        subjects=question.subjects,
        mentions=question.mentions,
    )


def _check_tasks(tasks: Sequence[str] | None) -> list[str]:
    tasks = list(TASKS if tasks is None else tasks)
    unknown = [t for t in tasks if t not in ANSWERS]
    if unknown or not tasks:
        raise ValueError(f"unknown or no tasks {unknown or tasks}: choose from {TASKS}")
    return tasks


def generate(
    n: int,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> list[ShapesExample]:
    """``n`` examples cycling over ``tasks`` (all six by default), so tasks are balanced."""
    tasks = _check_tasks(tasks)
    return [
        generate_one(tasks[i % len(tasks)], i // len(tasks), seed, image_size) for i in range(n)
    ]


def generate_per_task(
    n_per_task: int,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> list[ShapesExample]:
    """Exactly ``n_per_task`` examples of each task, grouped by task."""
    tasks = _check_tasks(tasks)
    return [generate_one(t, i, seed, image_size) for t in tasks for i in range(n_per_task)]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text)


def _question_annotations(example: ShapesExample, object_ids: list[str]) -> dict[str, str]:
    """GQA question annotations: token span (``"3"`` or ``"3:5"``) -> id of the named object."""
    words, start, spans = _words(example.question), 0, {}
    for phrase, index in example.mentions:
        target = _words(phrase)
        at = next(i for i in range(start, len(words)) if words[i : i + len(target)] == target)
        end = at + len(target)
        spans[str(at) if len(target) == 1 else f"{at}:{end}"] = object_ids[index]
        start = end
    return spans


def export_gqa(examples: Sequence[Example], out_dir: str | Path) -> Path:
    """Write ``examples`` in GQA's own format under ``out_dir`` and return it.

    Writes ``questions.json``, ``sceneGraphs.json`` and ``images/{imageId}.png``.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    questions, scene_graphs = {}, {}
    for example in examples:
        if not isinstance(example, ShapesExample):
            raise TypeError(
                f"example {example.example_id!r} carries no scene: export examples made by "
                "mmlens.data.shapes.generate"
            )
        image = example.load_image()
        object_ids = [f"{example.image_id}-o{k}" for k in range(len(example.objects))]
        scene_graphs[example.image_id] = {
            "width": image.width,
            "height": image.height,
            "objects": {
                oid: {
                    "name": o.shape,
                    "x": o.x,
                    "y": o.y,
                    "w": o.w,
                    "h": o.h,
                    "attributes": [o.color, o.size],
                    "relations": [],
                }
                for oid, o in zip(object_ids, example.objects, strict=True)
            },
        }
        answer_annotations = (
            {"0": object_ids[example.subjects[0]]} if example.task == "ChooseCat" else {}
        )
        questions[example.example_id] = {
            "imageId": example.image_id,
            "question": example.question,
            "answer": example.answer,
            "types": dict(GQA_TYPES[example.task]),
            "annotations": {
                "question": _question_annotations(example, object_ids),
                "answer": answer_annotations,
                "fullAnswer": {},
            },
        }
        image.save(out_dir / "images" / f"{example.image_id}.png")
    (out_dir / "questions.json").write_text(json.dumps(questions, indent=1))
    (out_dir / "sceneGraphs.json").write_text(json.dumps(scene_graphs, indent=1))
    return out_dir
