"""Free-form questions with reference answers, one JSON object a line:

    {"image": "kitchen.jpg", "prompt": "Describe the scene.", "reference": "a red kettle on a
     stove", "boxes": [[10, 20, 30, 40]], "id": "k1", "task": "Describe"}

``image`` is a path inside the file's folder (or ``images=``); ``boxes`` (optional) are
``(x, y, w, h)`` in pixels of the image; ``id`` defaults to ``{file stem}-{line}`` and
``task`` to ``"FreeForm"``. Each line becomes an ``Example`` whose ``question`` is the prompt
and ``answer`` the reference (``mmlens.methods.answer_flow`` teacher-forces it).
"""

from __future__ import annotations

import json
from pathlib import Path

from mmlens.core.errors import MMLensError
from mmlens.data.example import Example, check_box, check_image_id

REQUIRED = ("image", "prompt", "reference")


def load_answers_jsonl(path: str | Path, images: str | Path | None = None) -> list[Example]:
    """The examples of a JSONL file of ``{image, prompt, reference, boxes?}`` (see above)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file: give a JSONL file of "
                                "{image, prompt, reference, boxes?} objects")
    folder = Path(images) if images is not None else path.parent
    examples, seen = [], {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise MMLensError(f"{where} is not JSON ({error.msg}): one object a line") from None
        if not isinstance(record, dict):
            raise MMLensError(f"{where} holds {type(record).__name__}, not an object")
        missing = [key for key in REQUIRED if not isinstance(record.get(key), str)
                   or not record[key].strip()]
        if missing:
            raise MMLensError(f"{where} lacks {', '.join(missing)} (non-empty strings): each "
                              "line needs image, prompt and reference")
        image = check_image_id(record["image"], where)
        if not (folder / image).is_file():
            raise FileNotFoundError(f"{where}: image {image!r} is not in {folder}: give "
                                    "images= the folder the images are in")
        boxes = record.get("boxes") or []
        if not isinstance(boxes, list):
            raise MMLensError(f"{where}: boxes must be a list of [x, y, w, h]")
        example_id = str(record.get("id", f"{path.stem}-{number}"))
        if example_id in seen:
            raise MMLensError(f"{where} repeats the id {example_id!r} of line "
                              f"{seen[example_id]}: give each line its own id")
        seen[example_id] = number
        examples.append(Example(
            example_id=example_id,
            question=record["prompt"], answer=record["reference"],
            task=str(record.get("task", "FreeForm")), image_id=image,
            boxes=[check_box(box, where) for box in boxes], image_path=folder / image))
    if not examples:
        raise MMLensError(f"{path} holds no example: one JSON object a line")
    return examples
