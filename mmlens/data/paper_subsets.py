"""The paper's released GQA question subsets (one CSV per task) as ``Example`` records.

The files are those released with Zhang et al. (CVPR 2025), e.g.
``GQA_val_correct_question_with_choose_ChooseAttr.csv``: one row per question the model answered
correctly, with ``question_id``, ``img_id``, ``question``, ``answer``, ``false option`` (choose
tasks), and each object's box as four columns ``central object x`` / ``y`` / ``w`` / ``h`` or
``object1 x`` ... ``object2 h``, in pixels of the original image, ``-`` where the object is not
in the image. The task is the file name's last ``_`` part (or a ``task`` column). Images are
GQA's, joined by ``img_id`` as ``{images_dir}/{img_id}.jpg`` and not opened here.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from pathlib import Path

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
from mmlens.data.gqa import CENTRAL_OBJECT_TASKS, GQA_TYPES, check_tasks, sample_per_task

REQUIRED_COLUMNS = ("question_id", "img_id", "question", "answer")
ABSENT = ("-", "")


class PaperSubsetError(MMLensError):
    """A row or column of a paper subset CSV that cannot be read."""


def load_paper_subsets(
    folder: str | Path,
    images_dir: str | Path | None,
    *,
    tasks: Iterable[str] | None = None,
    n_per_task: int | None = None,
    seed: int = 0,
    rescale_boxes: bool = False,
) -> list[Example]:
    """Read every task CSV in ``folder``; other files (README, licence) are ignored.

    ``images_dir`` is GQA's ``images/`` folder (``None`` leaves ``image_path`` unset).
    ``n_per_task`` draws that many questions per task reproducibly from ``seed``; the result is
    ordered by task, then question id. Each example records the ``image_w`` x ``image_h`` its
    row gives; an image of another size is refused when loaded, or (``rescale_boxes``, same
    aspect ratio) its boxes are rescaled.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is not a folder: pass the folder holding the paper's subset CSVs"
        )
    csv_files = sorted(folder.glob("*.csv"))
    if not csv_files:
        raise FileNotFoundError(
            f"no .csv files in {folder}: expected the paper's subsets, one file per task, "
            "such as GQA_val_correct_question_with_choose_ChooseAttr.csv"
        )
    wanted = set(check_tasks(tasks))
    images = Path(images_dir) if images_dir is not None else None
    examples, seen = [], {}
    for path in csv_files:
        for example in read_subset_csv(path, images):
            if example.example_id in seen:
                raise PaperSubsetError(
                    f"question_id {example.example_id} appears in both {seen[example.example_id]} "
                    f"and {path.name}: remove the duplicate row"
                )
            seen[example.example_id] = path.name
            example.rescale_boxes = rescale_boxes
            if example.task in wanted:
                examples.append(example)
    return sample_per_task(examples, n_per_task, seed)


def read_subset_csv(path: str | Path, images_dir: Path | None = None) -> list[Example]:
    """All rows of one subset CSV, in file order."""
    path = Path(path)
    try:
        return _read_rows(path, images_dir)
    except UnicodeDecodeError as err:
        raise PaperSubsetError(
            f"{path}: not UTF-8 text (byte {err.start}: {err.reason}): save the file as UTF-8"
        ) from err
    except csv.Error as err:
        hint = (f" (the csv module reads fields of up to {csv.field_size_limit()} characters): "
                "is a quote left open?" if "field limit" in str(err) else ": check its quoting")
        raise PaperSubsetError(f"{path}: cannot be read as CSV, {err}{hint}") from err


def _read_rows(path: Path, images_dir: Path | None) -> list[Example]:
    # utf-8-sig: a byte order mark (as spreadsheet programs write) is not part of the first name
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        file_task = _task_from_name(path, columns)
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise PaperSubsetError(
                f"{path.name}: missing column(s) {missing}; the subsets have {REQUIRED_COLUMNS} "
                "and the object box columns"
            )
        examples, line = [], reader.line_num + 1
        for row_number, row in enumerate(reader, start=1):
            where = f"{path.name} row {row_number} (line {line})"
            examples.append(_row_example(row, file_task, columns, where, images_dir))
            line = reader.line_num + 1
    warn_boxes_outside(examples, path.name)
    return examples


def _row_example(
    row: dict, file_task: str | None, columns: list[str], where: str, images_dir: Path | None
) -> Example:
    if None in row or any(row[c] is None for c in columns):
        raise PaperSubsetError(
            f"{where}: the number of fields differs from the header's {len(columns)} columns: "
            "check the quoting of that row"
        )
    task = row.get("task") or file_task
    if task not in TASKS:
        raise PaperSubsetError(f"{where}, column 'task': {task!r} is not one of {list(TASKS)}")
    detailed = row.get("type_detailed")
    if detailed and detailed not in GQA_TYPES[task]:
        raise PaperSubsetError(
            f"{where}, column 'type_detailed': {detailed!r} is not a {task} type "
            f"{GQA_TYPES[task]}: is the row in the right file?"
        )
    for column in REQUIRED_COLUMNS:
        if not row[column].strip():
            raise PaperSubsetError(f"{where}, column {column!r}: empty")
    prefixes = ("central object",) if task in CENTRAL_OBJECT_TASKS else ("object1", "object2")
    size = _image_size(row, columns, where)
    boxes = [_box(row, prefix, columns, where, size) for prefix in prefixes]
    wrong = (row.get("false option") or "").strip()
    image_id = check_image_id(row["img_id"].strip(), f"{where}, column 'img_id'")
    return Example(
        example_id=row["question_id"].strip(),
        question=row["question"].strip(),
        answer=row["answer"].strip(),
        task=task,
        image_id=image_id,
        boxes=[box for box in boxes if box is not None],
        wrong_answer=None if wrong in ABSENT else wrong,
        image_path=images_dir / f"{image_id}.jpg" if images_dir is not None else None,
        image_size=size,
    )


def _image_size(row: dict, columns: list[str], where: str) -> ImageSize | None:
    """The size in columns ``image_w`` and ``image_h``, where the file has those columns."""
    if "image_w" not in columns or "image_h" not in columns:
        return None
    try:
        size = ImageSize(width=int(row["image_w"].strip()), height=int(row["image_h"].strip()))
    except ValueError:
        size = ImageSize(0, 0)
    if size.width <= 0 or size.height <= 0:
        raise PaperSubsetError(f"{where}, columns 'image_w'/'image_h': {row['image_w']!r}/"
                               f"{row['image_h']!r} are not positive whole numbers of pixels")
    return size


def _box(row: dict, prefix: str, columns: list[str], where: str,
         size: ImageSize | None) -> Box | None:
    """The ``(x, y, w, h)`` in columns ``'{prefix} x'`` ..., or ``None`` for an absent object."""
    names = [f"{prefix} {k}" for k in "xywh"]
    missing = [n for n in names if n not in columns]
    if missing:
        if prefix == "object2" and len(missing) == 4:
            return None
        raise PaperSubsetError(f"{where}: no box column(s) {missing} for the {prefix}")
    values = [row[n].strip() for n in names]
    if all(v in ABSENT for v in values):
        return None
    numbers = []
    for name, value in zip(names, values, strict=True):
        try:
            numbers.append(float(value))
        except ValueError:
            raise PaperSubsetError(
                f"{where}, column {name!r}: {value!r} is not a number "
                "(write '-' in all four box columns for an absent object)"
            ) from None
    bad = [n for n, v in zip(names, numbers, strict=True) if not math.isfinite(v)]
    if bad:
        raise PaperSubsetError(f"{where}, column(s) {bad}: not a finite number (NaN or "
                               "infinity); write '-' in all four box columns for an absent object")
    if numbers[2] < 0 or numbers[3] < 0:
        raise PaperSubsetError(f"{where}, columns {names[2]!r}/{names[3]!r}: negative size")
    if numbers[0] < 0 or numbers[1] < 0:
        raise PaperSubsetError(f"{where}, columns {names[0]!r}/{names[1]!r}: negative position")
    return check_box(numbers, f"{where}, the {prefix}")


def _task_from_name(path: Path, columns: list[str]) -> str | None:
    task = path.stem.rsplit("_", 1)[-1]
    if task in TASKS:
        return task
    if "task" in columns:
        return None
    raise PaperSubsetError(
        f"{path.name}: cannot tell the task: end the file name with _<task>.csv "
        f"(one of {list(TASKS)}) or add a 'task' column"
    )
