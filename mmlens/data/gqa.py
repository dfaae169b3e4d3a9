"""Real GQA (questions JSON + scene graphs JSON + images folder) as the paper's six tasks.

Only the GQA detailed types the paper studies are kept (``DETAILED_TYPE_TO_TASK``). Each example
gets the boxes of its objects: the central object for ChooseAttr / ChooseCat / QueryAttr, object
1 and object 2 (where they exist in the image) for ChooseRel / CompareAttr / LogicalObj. Objects
are read from the question's program (GQA's ``semantic`` field, whose arguments name object ids)
and, for files without one, from ``annotations.question`` in question order. Images are not
opened: ``image_path`` points at ``{images}/{imageId}.jpg`` (or ``.png``).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from mmlens.core.errors import MMLensError
from mmlens.core.sizes import ImageSize
from mmlens.data.example import (
    TASKS,
    Box,
    Example,
    check_box,
    check_image_id,
    warn_boxes_outside,
)

GQA_TYPES: dict[str, tuple[str, ...]] = {
    "ChooseAttr": ("chooseAttr", "materialChoose", "typeChoose", "activityChoose"),
    "ChooseCat": ("objThisChoose", "categoryThatChoose", "categoryThisChoose"),
    "ChooseRel": ("relChooser",),
    "CompareAttr": ("twoCommon",),
    "LogicalObj": ("existThatOr", "existThatOrC"),
    "QueryAttr": ("positionQuery",),
}
"""The GQA detailed question types of each task (the paper's table)."""
DETAILED_TYPE_TO_TASK = {kind: task for task, kinds in GQA_TYPES.items() for kind in kinds}
CHOOSE_TASKS = ("ChooseAttr", "ChooseCat", "ChooseRel")
CENTRAL_OBJECT_TASKS = ("ChooseAttr", "ChooseCat", "QueryAttr")

# file names tried in this order when a folder holds several
QUESTION_FILES = ("questions.json", "val_balanced_questions.json", "val_all_questions.json")
SCENE_GRAPH_FILES = ("sceneGraphs.json", "val_sceneGraphs.json")

_OBJECT_REF = re.compile(r"\((-|\d+)[^()]*\)\s*$")  # "jar (496168)", "mud (-) ", "men (1,2)"
_RELATION_FILLERS = {"to", "the", "of", "in"}


def load_gqa(
    root_or_files: str | Path | None = None,
    *,
    questions: str | Path | None = None,
    scene_graphs: str | Path | None = None,
    images: str | Path | None = None,
    tasks: Iterable[str] | None = None,
    n_per_task: int | None = None,
    seed: int = 0,
    rescale_boxes: bool = False,
) -> list[Example]:
    """Load GQA questions of the paper's task families as ``Example`` records.

    ``root_or_files`` is a GQA folder (questions, scene graphs and ``images/`` in it or one level
    down) or a questions JSON file; ``questions`` / ``scene_graphs`` / ``images`` override what
    is found there (relative paths are taken from the folder). ``n_per_task`` draws that many
    questions per task reproducibly from ``seed``; the result is ordered by task, then id.
    Each example records the image size its scene graph gives; an image of another size is
    refused when loaded, or (``rescale_boxes``, same aspect ratio) its boxes are rescaled.
    """
    files = _GqaFiles(*_resolve_files(root_or_files, questions, scene_graphs, images))
    graphs = _read_json_object(files.scene_graphs)
    wanted = set(check_tasks(tasks))
    examples = []
    for qid, entry in _read_json_object(files.questions).items():
        types = _field(entry, "types", files.questions, qid)
        task = DETAILED_TYPE_TO_TASK.get(_field(types, "detailed", files.questions, qid))
        if task in wanted:
            examples.append(_build_example(str(qid), task, entry, graphs, files))
    for example in examples:
        example.rescale_boxes = rescale_boxes
    warn_boxes_outside(examples, files.scene_graphs.name)
    return sample_per_task(examples, n_per_task, seed)


def is_gqa_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a GQA questions file and a scene graphs file."""
    if not Path(path).is_dir():
        return False
    try:
        _resolve_files(path, None, None, None)
    except (FileNotFoundError, ValueError):
        return False
    return True


def check_tasks(tasks: Iterable[str] | None) -> tuple[str, ...]:
    """The requested task names (all six for ``None``), refusing unknown ones."""
    if tasks is None:
        return TASKS
    requested = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    unknown = [t for t in requested if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}: choose from {list(TASKS)}")
    return requested


def sample_per_task(
    examples: Iterable[Example], n_per_task: int | None = None, seed: int = 0
) -> list[Example]:
    """Up to ``n_per_task`` examples of each task, ordered by task (``TASKS`` order) then id.

    Each task draws from its own generator seeded by ``(seed, task)``, so the sample of one task
    does not change when other tasks are added or removed. ``None`` keeps every example.
    """
    if n_per_task is not None and (not isinstance(n_per_task, int) or n_per_task < 1):
        raise ValueError(f"n_per_task must be a positive integer or None, got {n_per_task!r}")
    examples = list(examples)
    chosen = []
    for task in TASKS:
        pool = sorted((ex for ex in examples if ex.task == task), key=lambda ex: ex.example_id)
        if n_per_task is not None and n_per_task < len(pool):
            picked = random.Random(f"{seed}:{task}").sample(pool, n_per_task)
            pool = sorted(picked, key=lambda ex: ex.example_id)
        chosen.extend(pool)
    return chosen


def wrong_option_from_question(question: str, answer: str) -> str | None:
    """The other option of an ``"... X or Y?"`` question, or ``None`` where it is unclear.

    Best effort from the words alone: options of unequal length ("dark brown or white") can be
    cut short. GQA's program gives the options exactly and is preferred where present.
    """
    parts = re.split(r"\s+or\s+", question.strip().rstrip("?"))
    if len(parts) != 2:
        return None
    left, right, ans = _words(parts[0]), _words(parts[1]), _words(answer)
    if not ans or not left:
        return None
    start = 0  # skip "a", "the", "to the", "maybe", "is it" before the second option
    while start < len(right) and right[start] in _LEADING_WORDS and right[start] != ans[0]:
        start += 1
    second = []
    for word in right[start:]:
        if word in _ENDING_WORDS:
            break
        second.append(word)
    if second and left[-len(ans) :] == ans:
        return " ".join(second) if second != ans else None
    if second != ans:
        return None
    if "," in left[-4:]:  # "Which kind of animal is this, a cat or a bird?"
        first = left[len(left) - left[::-1].index(",") :]
    elif start and right[start - 1] in _ARTICLES and any(w in _ARTICLES for w in left[-4:]):
        last_article = max(i for i, w in enumerate(left) if w in _ARTICLES)
        first = left[last_article + 1 :]  # "a coffee maker or a toaster"
    elif left[-1] == ans[-1]:
        first = left[-len(ans) :]  # "short sleeved or long sleeved"
    else:
        first = left[-1:]
    first = [w for w in first if w not in _ARTICLES]
    return " ".join(first) or None


_ARTICLES = {"a", "an", "the"}
_LEADING_WORDS = _ARTICLES | {"to", "in", "maybe", "is", "are", "it", "they"}
_ENDING_WORDS = _ARTICLES | {",", "of", "him", "her", "them", "it", "me", "you", "this", "that"}


def _words(text: str) -> list[str]:
    return re.findall(r"[\w'-]+|,", text.lower())


class _GqaFiles(NamedTuple):
    questions: Path
    scene_graphs: Path
    images: Path


def _build_example(qid: str, task: str, entry: Any, graphs: dict, files: _GqaFiles) -> Example:
    image_id, question, answer = (
        str(_field(entry, name, files.questions, qid)) for name in ("imageId", "question", "answer")
    )
    object_ids = _question_objects(entry, files.questions, qid)
    object_ids = object_ids[:1] if task in CENTRAL_OBJECT_TASKS else object_ids[:2]
    size = _recorded_size(graphs.get(image_id), files.scene_graphs, image_id)
    boxes = [_object_box(graphs, files.scene_graphs, image_id, obj, qid)
             for obj in object_ids]
    wrong = None
    if task in CHOOSE_TASKS:
        wrong = _wrong_from_program(entry.get("semantic"), answer)
        wrong = wrong or wrong_option_from_question(question, answer)
    return Example(
        example_id=qid,
        question=question,
        answer=answer,
        task=task,
        image_id=image_id,
        boxes=boxes,
        wrong_answer=wrong,
        image_path=_image_path(files.images, image_id, files.questions, qid),
        image_size=size,
    )


def _recorded_size(graph: Any, path: Path, image_id: str) -> ImageSize | None:
    """The scene graph's ``width`` and ``height`` of the image, ``None`` where it gives none."""
    if not isinstance(graph, dict) or "width" not in graph or "height" not in graph:
        return None
    try:
        width, height = int(graph["width"]), int(graph["height"])
    except (TypeError, ValueError):
        width = height = 0
    if width <= 0 or height <= 0:
        raise MMLensError(f"{path.name}: image '{image_id}' has width/height "
                          f"{graph['width']!r}/{graph['height']!r}: they must be positive integers")
    return ImageSize(width=width, height=height)


def _question_objects(entry: dict, path: Path, qid: str) -> list[str]:
    """Ids of the objects the question is about, object 1 first; absent objects are left out."""
    program = entry.get("semantic")
    if isinstance(program, list) and program:

        def object_of(index: int) -> str | None:
            op = program[index]
            ref = _OBJECT_REF.search(str(op.get("argument", "")))
            if ref:
                return None if ref.group(1) == "-" else ref.group(1)
            deps = op.get("dependencies") or []
            return object_of(deps[0]) if deps else None

        final = program[-1]
        deps = final.get("dependencies") or []
        if _OBJECT_REF.search(str(final.get("argument", ""))):  # "choose rel": subject, object
            objects = [object_of(deps[0]) if deps else None, object_of(len(program) - 1)]
        else:
            objects = [object_of(d) for d in deps]
        return [obj for obj in objects if obj is not None]
    spans = _field(_field(entry, "annotations", path, qid), "question", path, qid)
    if not isinstance(spans, dict) or not all(re.fullmatch(r"\d+(:\d+)?", str(span))
                                              for span in spans):
        raise MMLensError(f"{path.name}: question '{qid}', field annotations.question: "
                          f"{spans!r} must map token spans such as \"3\" or \"5:7\" (whole "
                          "numbers) to object ids")
    in_question_order = sorted(spans, key=lambda span: int(span.split(":")[0]))  # "3", "5:7"
    return list(dict.fromkeys(str(spans[span]) for span in in_question_order))


def _wrong_from_program(program: Any, answer: str) -> str | None:
    """The other option of the final ``choose`` step ("empty|full"), if it has exactly two."""
    final = program[-1] if isinstance(program, list) and program else {}
    operation, argument = str(final.get("operation", "")), str(final.get("argument", ""))
    options = [o.strip() for o in argument.split("|")]
    if operation == "choose rel":  # "surfer,to the right of|to the left of,s (1)" -> right, left
        middle = argument.split(",")[1] if argument.count(",") >= 2 else ""
        options = [
            " ".join(w for w in o.split() if w not in _RELATION_FILLERS) for o in middle.split("|")
        ]
    others = [o for o in options if o != answer]
    if not operation.startswith("choose") or len(options) != 2 or len(others) != 1:
        return None
    return others[0]


def _object_box(graphs: dict, graphs_path: Path, image_id: str, obj: str, qid: str) -> Box:
    if image_id not in graphs:
        raise ValueError(
            f"{graphs_path.name}: no scene graph for image '{image_id}' (question '{qid}'): "
            "pass the scene graphs of the same split as the questions"
        )
    objects = _field(graphs[image_id], "objects", graphs_path, image_id, what="image")
    if obj not in objects:
        raise ValueError(
            f"{graphs_path.name}: image '{image_id}' has no object '{obj}' "
            f"(named by question '{qid}'): the scene graphs do not match the questions"
        )
    fields = [
        _field(objects[obj], k, graphs_path, f"{image_id}/{obj}", what="object") for k in "xywh"
    ]
    return check_box(fields, f"{graphs_path.name}: object '{obj}' of image '{image_id}' "
                     f"(question '{qid}')")


def _image_path(images_dir: Path, image_id: str, path: Path, qid: str) -> Path:
    check_image_id(image_id, f"{path.name}: question '{qid}', field 'imageId'")
    for suffix in (".jpg", ".png"):
        candidate = images_dir / f"{image_id}{suffix}"
        if candidate.is_file():
            return candidate
    return images_dir / f"{image_id}.jpg"


def _field(entry: Any, name: str, path: Path, key: str, *, what: str = "question") -> Any:
    if not isinstance(entry, dict) or name not in entry:
        raise ValueError(
            f"{path.name}: {what} '{key}' has no field '{name}': is {path} a GQA "
            f"{'questions' if what == 'question' else 'scene graphs'} file?"
        )
    return entry[name]


def _read_json_object(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass the path of the GQA file")
    repeated_keys: list[str] = []  # of the JSON object read last: the outermost one

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict:
        data = dict(pairs)
        repeated = []
        if len(data) != len(pairs):
            seen: set[str] = set()
            repeated = [k for k, _ in pairs if k in seen or seen.add(k)]
        repeated_keys[:] = repeated
        return data

    try:
        with open(path, encoding="utf-8-sig") as handle:  # -sig: a leading BOM is not data
            data = json.load(handle, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as err:
        raise MMLensError(f"{path.name}: not valid JSON ({err}): is the file complete?") from err
    except RecursionError:
        raise MMLensError(f"{path}: JSON nested too deeply to read; a GQA file nests a few "
                          "levels: is it the right file?") from None
    except UnicodeDecodeError as err:
        raise MMLensError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}): save the "
                          "file as UTF-8") from err
    if repeated_keys:
        ids = sorted(set(repeated_keys))
        raise MMLensError(f"{path.name}: id(s) {ids[:10]} appear more than once; JSON keeps only "
                          "the last of each: remove the duplicates")
    if not isinstance(data, dict):
        raise ValueError(
            f"{path.name}: expected a JSON object keyed by id, got {type(data).__name__}"
        )
    return data


def _resolve_files(root_or_files, questions, scene_graphs, images) -> tuple[Path, Path, Path]:
    root = Path(root_or_files) if root_or_files is not None else None
    if root is not None and root.is_file():
        questions, root = questions or root.resolve(), root.parent
    if root is not None and not root.is_dir():
        raise FileNotFoundError(
            f"{root} does not exist: pass a GQA folder or a questions JSON file"
        )
    if root is None and (questions is None or scene_graphs is None):
        raise ValueError("give a GQA folder, or both questions= and scene_graphs= file paths")

    def located(given, names: tuple[str, ...], kind: str, pattern: str) -> Path:
        if given is not None:
            return root / given if root is not None else Path(given)
        return _find_file(root, names, kind, pattern)

    questions_path = located(questions, QUESTION_FILES, "questions", "*questions*.json")
    graphs_path = located(scene_graphs, SCENE_GRAPH_FILES, "scene graphs", "*sceneGraphs*.json")
    if images is not None:
        images_dir = root / images if root is not None else Path(images)
    else:
        images_dir = questions_path.parent / "images"
        if root is not None and not images_dir.is_dir():
            images_dir = root / "images"
    return questions_path, graphs_path, images_dir


def _find_file(root: Path, names: tuple[str, ...], kind: str, pattern: str) -> Path:
    # one level down covers GQA's own layout (questions1.2/, sceneGraphs/); images/ is huge
    folders = [root, *sorted(p for p in root.iterdir() if p.is_dir() and p.name != "images")]
    found = [f for folder in folders for f in sorted(folder.glob(pattern)) if f.is_file()]
    for name in names:
        for candidate in found:
            if candidate.name == name:
                return candidate
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(
            f"{root} is not a GQA folder: expected a {kind} file ({' or '.join(names)}) in it or "
            f"one folder down, plus images/; pass questions=, scene_graphs=, images= otherwise"
        )
    raise ValueError(
        f"{root} holds several {kind} files ({', '.join(f.name for f in found)}): "
        f"choose one with {'questions' if kind == 'questions' else 'scene_graphs'}=..."
    )
