"""The paper's study exactly: its question subsets, prompts, windows, flows and figures.

    reproduce("runs/llava-1.5-7b", model="llava-hf/llava-1.5-7b-hf",
              gqa_images="gqa/images", subsets="paper-subsets", device="cuda", dtype="float16")

Uses the model's paper preset (``mmlens.experiments.presets``; found from the model's name or
config, or chosen with ``preset=``): the paper's prompt and tokenization, window 7 for
32-layer and 9 for 40-layer models, the image preprocessing the checkpoint was trained with,
the pixel rule for related patches, 0% rows for empty spans, the six flows, and the
correctness filter (``only_correct=False`` keeps every question). Writes what ``mmlens flow``
writes, ``summary.csv`` included (per task and flow: centre layer of the largest drop, its
size, and the layer range where the drop exceeds half of it, with bootstrap intervals).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mmlens.experiments.presets import PAPER_FLOWS
from mmlens.experiments.study import run_study
from mmlens.experiments.study_data import is_paper_subsets_folder


def reproduce(
    out: str | Path,
    *,
    model: str,
    gqa_images: str | Path,
    subsets: str | Path,
    tasks: Sequence[str] | None = None,
    per_task: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int | str = 64,
    max_memory: int | None = None,
    device_map: str | dict | None = None,
    progress: bool = True,
    rescale_boxes: bool = False,
    shard: tuple[int, int] | None = None,
    preset: str | None = None,
    only_correct: bool = True,
    metric: str = "prob",
    controls: bool = False,
    control_seed: int | None = None,
    filter_max_new_tokens: int | None = None,
    break_lock: bool = False,
    word_maps: bool = True,
    tuned_lens: str | Path | None = None,
    **settings: str | None,
) -> Path:
    """Run the paper's study for one model; resumable like ``mmlens flow``.

    ``preset``: the paper preset (default: found from the model's name or config; ``"none"``
    for none); ``settings`` (``template``, ``preprocessing``, ``tokenization``,
    ``related_rule``, ``empty_spans``, ``window``) override its choices. ``only_correct=False``
    keeps the examples the model answers wrongly. ``control_seed``, ``filter_max_new_tokens``,
    ``word_maps``, ``tuned_lens``: as in ``run_study``. ``rescale_boxes``: images at another
    resolution than the subsets record (same aspect ratio) get their boxes rescaled instead of
    being refused.
    """
    if not is_paper_subsets_folder(subsets):
        raise FileNotFoundError(
            f"{subsets} holds none of the paper's subset files (GQA_val_correct_question_with_"
            "..._TASK.csv): pass the folder of the six CSV files")
    return run_study(
        out, model=model, data=str(subsets), images=gqa_images, tasks=tasks, per_task=per_task,
        flows=PAPER_FLOWS, device=device, dtype=dtype, only_correct=only_correct,
        batch_size=batch_size, max_memory=max_memory, device_map=device_map, progress=progress,
        rescale_boxes=rescale_boxes, shard=shard, preset=preset, metric=metric,
        controls=controls, control_seed=control_seed,
        filter_max_new_tokens=filter_max_new_tokens, break_lock=break_lock,
        word_maps=word_maps, tuned_lens=tuned_lens, **settings,
    )
