"""The examples of a study run: synthetic shapes, a GQA folder, the paper's question subsets
joined with GQA images, or a JSONL file of free-form answers (``--data``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmlens.core.errors import MMLensError
from mmlens.data.shapes_questions import FREE_FORM_TASKS
from mmlens.experiments.free_form.run import is_answers_file


def is_paper_subsets_folder(path: str | Path) -> bool:
    """A folder holding the paper's released question subsets (one CSV per task)."""
    return Path(path).is_dir() and any(Path(path).glob("GQA_*_*.csv"))


def load_examples(data: str, *, tasks: Sequence[str] | None, per_task: int | None,
                  seed: int, images: str | Path | None = None) -> list[Any]:
    """Fresh synthetic shapes (``"shapes"``) or a GQA folder, ``per_task`` questions per task;
    or every line of a JSONL file of free-form answers (``load_answers_jsonl``)."""
    from mmlens.data.answers_jsonl import load_answers_jsonl
    from mmlens.data.gqa import check_tasks, is_gqa_folder, load_gqa

    if is_answers_file(data):
        if tasks:
            raise MMLensError(f"--data {data} runs the free-form study on every line of the "
                              "file: drop --tasks (a line's task is its \"task\" field)")
        return load_answers_jsonl(data)
    free = [t for t in tasks or () if t in FREE_FORM_TASKS]
    if free and data != "shapes":
        raise MMLensError(f"the free-form task(s) {free} come with the bundled data: pass "
                          "--data shapes")
    tasks = list(check_tasks([t for t in tasks if t not in free] if free else tasks)) + free
    if per_task is None and is_paper_subsets_folder(data):
        return _paper_examples(data, images, tasks, None, seed)
    if not isinstance(per_task, int) or per_task < 1:
        raise ValueError(f"per_task must be a positive integer, got {per_task!r}")
    if data == "shapes":
        from mmlens.data.shapes import generate_per_task

        return generate_per_task(per_task, seed=seed, tasks=tasks)
    if not Path(data).exists():
        raise FileNotFoundError(f"data {data!r} is neither 'shapes' nor an existing folder: "
                                "pass --data shapes or the path of a GQA folder")
    if is_paper_subsets_folder(data):
        return _paper_examples(data, images, tasks, per_task, seed)
    if not is_gqa_folder(data):
        raise ValueError(f"{data} is not a GQA folder: it needs a questions JSON file "
                         "(e.g. val_balanced_questions.json), a scene graphs JSON file and "
                         "images/ in it or one folder down")
    examples = load_gqa(data, tasks=tasks, n_per_task=per_task, seed=seed)
    if not examples:
        raise ValueError(f"{data} holds no question of the tasks {tasks}")
    missing = [e for e in examples if e.image is None and not Path(e.image_path).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images are missing, e.g. {missing[0].image_path}"
                                ": put the GQA images in the folder's images/")
    return examples


def _paper_examples(folder: str | Path, images: str | Path | None, tasks: Sequence[str],
                    per_task: int | None, seed: int) -> list[Any]:
    """The paper's question subsets joined with GQA images by ``img_id``; images checked first."""
    from mmlens.data.paper_subsets import load_paper_subsets

    if images is None or not Path(images).is_dir():
        raise FileNotFoundError(f"GQA images folder {images!r} not found: pass --gqa-images, the "
                                "folder holding {img_id}.jpg for the subsets' questions")
    examples = load_paper_subsets(folder, images, tasks=tasks, n_per_task=per_task, seed=seed)
    if not examples:
        raise MMLensError(f"the task filter {list(tasks)} left none of the questions in {folder}"
                          ": its CSV files hold other tasks (file names end in _<task>.csv)")
    missing = [e for e in examples if not Path(e.image_path).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(examples)} images are missing from "
                                f"{images}, e.g. {missing[0].image_path}")
    return examples
