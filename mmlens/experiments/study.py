"""The whole study in one call, as ``mmlens flow`` runs it: data, model, sweep, emergence, report.

    out = run_study("runs/flow", model="shapes-llava", data="shapes", per_task=30)

writes into ``out``: ``run.json`` (the arguments, the resolved settings: preset, template,
preprocessing, tokenization, related rule, empty spans, window, metric; versions and the
weights' checksum), ``flow.jsonl`` (the resumable store), ``flow.csv`` (one row per example x
flow x centre layer), ``summary.csv``, ``dropped.csv``, ``emergence.csv``, ``examples.jsonl``
(what each example gave the model, ``mmlens.experiments.provenance``) and ``report.html``.
Running it again with the same arguments and folder resumes the sweep. Every example gets one
clean run, shared by the correctness filter, the knockouts and answer emergence.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mmlens.experiments.emergence import emergence_frame
from mmlens.experiments.knockouts import DEFAULT_FLOWS, parse_flows
from mmlens.experiments.presets import resolve_settings
from mmlens.experiments.provenance import run_provenance, write_examples
from mmlens.experiments.summary import flow_summary
from mmlens.experiments.sweep import dropped_examples, information_flow
from mmlens.experiments.views import example_views

DEFAULT_MODEL = "shapes-llava"
DEFAULT_PER_TASK = 60
SMALL_WIDTH = 1024


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block on ``threads`` CPU threads (None: unchanged), then restore the count."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def default_out_dir() -> Path:
    return Path("runs") / time.strftime("flow-%Y%m%d-%H%M%S")


def is_paper_subsets_folder(path: str | Path) -> bool:
    """A folder holding the paper's released question subsets (one CSV per task)."""
    return Path(path).is_dir() and any(Path(path).glob("GQA_*_*.csv"))


def load_examples(data: str, *, tasks: Sequence[str] | None, per_task: int | None,
                  seed: int, images: str | Path | None = None) -> list[Any]:
    """Fresh synthetic shapes (``"shapes"``) or a GQA folder, ``per_task`` questions per task."""
    from mmlens.data.gqa import check_tasks, is_gqa_folder, load_gqa

    tasks = list(check_tasks(tasks))
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
    missing = [e for e in examples if not Path(e.image_path).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(examples)} images are missing from "
                                f"{images}, e.g. {missing[0].image_path}")
    return examples


def run_study(
    out: str | Path | None = None,
    *,
    model: str = DEFAULT_MODEL,
    data: str = "shapes",
    tasks: Sequence[str] | None = None,
    per_task: int | None = DEFAULT_PER_TASK,
    images: str | Path | None = None,
    flows: Sequence[str] | str = DEFAULT_FLOWS,
    window: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    only_correct: bool = True,
    batch_size: int = 64,
    progress: bool = True,
    threads: int | None = None,
    preset: str | None = None,
    metric: str = "prob",
    controls: bool = False,
    **settings: str | None,
) -> Path:
    """Run the information-flow study and write its tables and report into ``out``.

    ``preset``: one of the paper's checkpoints (``mmlens.experiments.presets``), applied to
    any model; None finds it from the model's name or config; ``"none"``: no preset.
    ``settings``: ``template``, ``preprocessing``, ``tokenization``, ``related_rule``,
    ``empty_spans`` overriding the preset's. ``metric``: ``prob`` | ``logprob`` |
    ``logit-diff``. ``controls``: a random control per flow.

    ``threads``: CPU threads for torch. By default a small model (``d_model`` up to 1024) on
    the CPU runs on one thread: its many small operations gain little from more, and stall
    badly when other work shares the cores.
    """
    from mmlens.experiments.report import build_report
    from mmlens.model.hooked import HookedMultimodalTransformer

    flow_names = [flow.name for flow in parse_flows(flows)]
    examples = load_examples(data, tasks=tasks, per_task=per_task, seed=seed, images=images)
    out = Path(out) if out is not None else default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    hooked = HookedMultimodalTransformer.from_pretrained(model, dtype=dtype, device=device)
    on_cpu = hooked.embed.W_E.device.type == "cpu"
    if threads is None and on_cpu and hooked.cfg.d_model <= SMALL_WIDTH:
        threads = 1
    resolved = resolve_settings(hooked, preset, window=window, **settings)
    print(f"mmlens: {resolved.describe()}", file=sys.stderr)
    arguments = {"model": model, "data": data, "tasks": tasks, "per_task": per_task,
                 "flows": flow_names, "window": window, "device": device, "dtype": dtype,
                 "seed": seed, "only_correct": only_correct, "threads": threads,
                 "preset": preset, "metric": metric, "controls": controls, **settings}
    with torch_threads(threads):
        started = time.time()
        frame = information_flow(
            hooked, examples, flows=flow_names, preset=resolved, only_correct=only_correct,
            store=out / "flow.jsonl", batch_size=batch_size, progress=progress, metric=metric,
            controls=controls, seed=seed, lens=hooked.tokenizer is not None,
        )
        frame.to_csv(out / "flow.csv", index=False)
        if not frame.empty:
            flow_summary(frame, seed=seed).to_csv(out / "summary.csv", index=False)
        dropped = dropped_examples(frame)
        dropped.to_csv(out / "dropped.csv", index=False)
        kept = set(frame.example_id)
        records = frame.attrs["records"]
        emergence_frame(records).to_csv(out / "emergence.csv", index=False)
        write_examples(out / "examples.jsonl", records,
                       {str(e.example_id): str(e.answer) for e in examples})
        if hooked.processor is not None:
            views = example_views(hooked, examples, records, resolved.prepare_options())
            (out / "views.json").write_text(json.dumps(views))
        summary = {
            "arguments": arguments, **frame.attrs["settings"], "metric": metric,
            "controls": controls, **run_provenance(hooked), "window": frame.attrs["window"],
            "n_layers": hooked.cfg.n_layers, "n_examples": len(examples), "n_kept": len(kept),
            "n_dropped": int((dropped["flow"] == "all").sum()),
            "seconds": round(time.time() - started, 1),
        }
        (out / "run.json").write_text(json.dumps(summary, indent=1))
    build_report(out)
    return out


def hook_shapes(model) -> list[tuple[str, tuple[int, ...]]]:
    """Every hook point of ``model`` with its activation's shape on a one-example prompt."""
    from PIL import Image

    size = model.cfg.vision.image_size
    batch = model.prepare(Image.new("RGB", (size, size), (128, 128, 128)),
                          "What is in the image?")
    _, cache = model.run_with_cache(batch)
    return [(name, tuple(cache[name].shape)) for name in model.hook_dict if name in cache]
