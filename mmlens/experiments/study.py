"""The whole study in one call, as ``mmlens flow`` runs it: data, model, sweep, emergence, report.

    out = run_study("runs/flow", model="shapes-llava", data="shapes", per_task=30)

writes into ``out``: ``run.json`` (the arguments, the resolved settings: preset, template,
preprocessing, tokenization, related rule, empty spans, window, metric; versions and the
weights' checksum), ``flow.jsonl`` (the resumable store), ``flow.csv`` (one row per example x
flow x centre layer), ``summary.csv``, ``dropped.csv``, ``emergence.csv``, ``examples.jsonl``
(what each example gave the model, ``mmlens.experiments.provenance``), ``views.json`` and
``report.html``. Running it again with the same arguments and folder resumes the sweep. Every
example gets one clean run, shared by the correctness filter, the knockouts and answer
emergence. The folder is locked while the study runs, and every file is replaced atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from numbers import Integral
from pathlib import Path
from typing import Any

import torch

from mmlens.core.errors import MMLensError
from mmlens.data.shapes_questions import FREE_FORM_TASKS
from mmlens.experiments.answer_run import free_form_flows, is_answers_file
from mmlens.experiments.controls import control_seed_of
from mmlens.experiments.knockouts import DEFAULT_FLOWS, parse_flows
from mmlens.experiments.presets import resolve_settings
from mmlens.experiments.provenance import run_provenance
from mmlens.experiments.runfolder.atomic import write_atomic
from mmlens.experiments.runfolder.distributed import close_ranks, init_ranks, rank_device
from mmlens.experiments.runfolder.lock import FolderBusyError, RunLock
from mmlens.experiments.sweep import AllDroppedWarning, dropped_examples, information_flow
from mmlens.experiments.tables import (
    STORE_NAME,
    all_dropped_message,
    write_flow_tables,
    write_run_json,
)
from mmlens.experiments.views import example_views
from mmlens.model.protocol import HookedModel

DEFAULT_MODEL = "shapes-llava"
DEFAULT_PER_TASK = 60
SMALL_WIDTH = 1024


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block on ``threads`` CPU threads (None: unchanged), then restore the count."""
    check_count(threads, "threads", "--threads")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def check_count(value: Any, name: str, flag: str, *, least: int = 1) -> None:
    """Refuse ``value`` unless it is None or a whole number >= ``least``, naming the flag."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, Integral)
                              or value < least):
        raise MMLensError(f"{name}={value!r} ({flag}): give a whole number of at least {least}")


DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
"""The device types mmlens runs on (each where torch finds its backend)."""


def check_device(device: str | None) -> None:
    """Refuse a device torch cannot run here (unknown, or no such GPU), before any loading."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise MMLensError(f"--device {device!r} is not a device mmlens runs on: pass cpu, "
                          "cuda, cuda:N, mps or xpu")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but torch sees no CUDA GPU here: pass "
                         "--device cpu, or run where a GPU and a CUDA build of torch are")
    backend = {"mps": torch.backends.mps, "xpu": getattr(torch, "xpu", None)}.get(parsed.type)
    if parsed.type in ("mps", "xpu") and not (backend and backend.is_available()):
        raise MMLensError(f"--device {device} asked for, but torch has no {parsed.type} "
                          "backend here: pass --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and (
            parsed.index >= torch.cuda.device_count()):
        raise MMLensError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA "
                          f"GPU(s), numbered from 0: pass cuda:0 to "
                          f"cuda:{torch.cuda.device_count() - 1}")


def default_out_dir() -> Path:
    return Path("runs") / time.strftime("flow-%Y%m%d-%H%M%S")


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
    batch_size: int | str = 64,
    max_memory: int | None = None,
    device_map: str | dict | None = None,
    progress: bool = True,
    threads: int | None = None,
    rescale_boxes: bool = False,
    shard: tuple[int, int] | None = None,
    preset: str | None = None,
    metric: str = "prob",
    controls: bool = False,
    control_seed: int | None = None,
    filter_max_new_tokens: int | None = None,
    break_lock: bool = False,
    word_maps: bool = True,
    tuned_lens: str | Path | None = None,
    reference: bool = False,
    answer_flows: Sequence[str] | str | None = None,
    **settings: str | None,
) -> Path:
    """Run the information-flow study and write its tables and report into ``out``.

    ``preset``: one of the paper's checkpoints (``mmlens.experiments.presets``), applied to
    any model; None finds it from the model's name or config; ``"none"``: no preset.
    ``settings``: ``template``, ``preprocessing``, ``tokenization``, ``related_rule``,
    ``empty_spans`` overriding the preset's. ``metric``: ``prob`` | ``logprob`` |
    ``logit-diff``. ``controls``: a random control per flow, drawn from ``control_seed``
    (default: ``seed``, the data's). ``filter_max_new_tokens``: how far the correctness filter
    decodes (default 128, the paper's).

    ``threads``: CPU threads for torch. By default a small model (``d_model`` up to 1024) on
    the CPU runs on one thread: its many small operations gain little from more, and stall
    badly when other work shares the cores. ``rescale_boxes``: an image whose size differs
    from the size the data records (same aspect ratio) gets its boxes rescaled, not refused.
    ``shard=(K, N)``: only the K-th of N disjoint shares of the examples (``mmlens merge``
    joins the shards' folders; each shard needs its own folder). ``break_lock``: take the
    folder's lock from a run known to be gone (``mmlens.experiments.runfolder.lock``).
    ``word_maps=False``: no causal maps of the example views' words (they change no row of the
    tables, so a resume may switch them). ``tuned_lens``: a folder saved by ``TunedLens.save``
    for this model; emergence gains its ``tuned`` reading (its digest joins the signature). Under
    ``torchrun`` the examples are dealt out over the ranks and rank 0 writes the tables and
    report.

    Examples of free-form tasks (``Describe``) go to the free-form study
    (``mmlens.experiments.answer_run``) over ``answer_flows``, teacher-forced on the model's
    own answer, or on the reference with ``reference=True``; the one-word tasks of the same
    run to the study above, on the same loaded model. ``data`` a ``.jsonl`` file of
    ``{image, prompt, reference, boxes?}`` runs the free-form study on all its lines. Both
    parts take ``shard``; the free-form one refuses torchrun.
    """
    check_device(device)
    check_count(threads, "threads", "--threads")
    check_count(seed, "seed", "--seed", least=0)
    flow_names = [flow.name for flow in parse_flows(flows)]
    examples = load_examples(data, tasks=tasks, per_task=per_task, seed=seed, images=images)
    if shard is not None and shard[0] >= len(examples):
        raise MMLensError(f"shard {shard[0]}/{shard[1]} is empty: the {len(examples)} examples "
                          f"fill only shards 0 to {len(examples) - 1}; split into at most "
                          f"{len(examples)} shards, or merge the shards that hold examples")
    for example in examples:
        example.rescale_boxes = rescale_boxes
    out = Path(out) if out is not None else default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    ranks = init_ranks(device)
    lock = RunLock(out, break_lock=break_lock)
    try:
        refusal = None
        if ranks.is_main:
            try:
                lock.acquire()
            except FolderBusyError as err:
                refusal = str(err)
        refusal = ranks.from_main(refusal)
        if refusal is not None:
            raise FolderBusyError(refusal)
        answers = is_answers_file(data)
        free = [e for e in examples if answers or e.task in FREE_FORM_TASKS]
        examples = [e for e in examples if not answers and e.task not in FREE_FORM_TASKS]
        if free and ranks.world > 1:
            raise MMLensError(FREE_FORM_ONE_PROCESS)
        for part, name in ((free, "free-form"), (examples, "one-word")):
            if part and shard is not None and shard[0] >= len(part):
                raise MMLensError(f"shard {shard[0]}/{shard[1]} holds none of the {len(part)} "
                                  f"{name} examples: split into at most {len(part)} shards, "
                                  "or run the free-form and one-word tasks in separate folders")
        if free:
            answer_flows = free_form_flows(free, answer_flows, data)
        hooked = _load(model, dtype=dtype, device=rank_device(device, ranks),
                       device_map=device_map)
        if examples:
            _study(out, examples, hooked=hooked, model=model, data=data, tasks=tasks,
                      per_task=per_task, flow_names=flow_names, window=window,
                      device=rank_device(device, ranks),
                      dtype=dtype, seed=seed, only_correct=only_correct, batch_size=batch_size,
                      progress=progress, threads=threads, shard=shard, ranks=ranks,
                      max_memory=max_memory, rescale_boxes=rescale_boxes,
                      preset=preset, metric=metric, controls=controls,
                      control_seed=control_seed, filter_max_new_tokens=filter_max_new_tokens,
                      word_maps=word_maps, tuned_lens=tuned_lens, settings=settings)
        if free:
            _free_form(out, free, hooked=hooked, model=model, data=data,
                       answer_flows=answer_flows, reference=reference,
                       only_correct=only_correct, window=window, device=device, dtype=dtype,
                       seed=seed, progress=progress, preset=preset,
                       filter_max_new_tokens=filter_max_new_tokens, threads=threads,
                       shard=shard, settings=settings)
        return out
    finally:
        lock.release()
        close_ranks(ranks)


FREE_FORM_ONE_PROCESS = (
    "the free-form study does not run under torchrun (it deals out only the one-word tasks): "
    "split it over processes with a job array instead, `mmlens flow --tasks Describe --shard "
    "K/N --out runs/part-K` for K = 0..N-1, then `mmlens merge runs/all runs/part-*`")


def _load(model: str, **options: Any) -> HookedModel:
    """The model both parts of a run use, loaded once."""
    from mmlens.model.hooked import HookedMultimodalTransformer

    return HookedMultimodalTransformer.from_pretrained(model, **options)


def _free_form(out: Path, free: list[Any], *, answer_flows: list[str],
               reference: bool, threads: int | None, **options: Any) -> None:
    """The free-form study's part of the folder (``run_free_form``), then the report."""
    from mmlens.experiments.answer_run import run_free_form
    from mmlens.experiments.report import build_report

    with torch_threads(threads if threads is not None else 1):
        run_free_form(out, free, flows=answer_flows,
                      forced="reference" if reference else "generated", **options)
    build_report(out)


def _study(out: Path, examples: list[Any], *, hooked: HookedModel, model: str, data: str,
           tasks, per_task, flow_names: list[str], window: int | None, device: str | None,
           dtype: str | None, seed: int, only_correct: bool, batch_size: int | str, progress: bool,
           threads: int | None, shard: tuple[int, int] | None, ranks,
           max_memory: int | None, rescale_boxes: bool,
           preset: str | None, metric: str, controls: bool, control_seed: int | None,
           filter_max_new_tokens: int | None, word_maps: bool, tuned_lens: str | Path | None,
           settings: dict[str, Any]) -> Path:
    from mmlens.experiments.report import build_report
    from mmlens.methods.tuned_lens import load_tuned_lens

    lens = None if tuned_lens is None else load_tuned_lens(tuned_lens, hooked)
    if lens is not None and hooked.tokenizer is None:
        raise MMLensError(f"--tuned-lens adds a reading to answer emergence, which tracks answer "
                          f"words: {model} has no tokenizer; drop --tuned-lens")
    on_cpu = hooked.embed.W_E.device.type == "cpu"
    if threads is None and on_cpu and hooked.cfg.d_model <= SMALL_WIDTH:
        threads = 1
    resolved = resolve_settings(hooked, preset, window=window,
                                control_seed=control_seed_of(controls, control_seed, seed),
                                filter_max_new_tokens=filter_max_new_tokens, **settings)
    if ranks.is_main:
        print(f"mmlens: {resolved.describe()}", file=sys.stderr)
    arguments = {"model": model, "data": data, "tasks": tasks, "per_task": per_task,
                 "flows": flow_names, "window": window, "device": device, "dtype": dtype,
                 "seed": seed, "only_correct": only_correct, "threads": threads,
                 "rescale_boxes": rescale_boxes, "shard": list(shard) if shard else None,
                 "preset": preset, "metric": metric, "controls": controls,
                 "control_seed": control_seed, "filter_max_new_tokens": filter_max_new_tokens,
                 "word_maps": word_maps,
                 "tuned_lens": None if tuned_lens is None else str(tuned_lens), **settings}
    # The store's signature covers every example, so the shards of one study can be merged.
    mine = examples[shard[0]::shard[1]] if shard is not None else examples
    with torch_threads(threads), warnings.catch_warnings():
        warnings.simplefilter("ignore", AllDroppedWarning)  # refused below, with the folder
        started = time.time()
        frame = information_flow(
            hooked, examples, flows=flow_names, preset=resolved, only_correct=only_correct,
            store=out / STORE_NAME, batch_size=batch_size, max_memory=max_memory,
            progress=progress, ranks=ranks, shard=shard, metric=metric, controls=controls,
            seed=seed, control_seed=control_seed, max_new_tokens=filter_max_new_tokens,
            lens=hooked.tokenizer is not None, tuned_lens=lens,
        )
        sweep_seconds = round(time.time() - started, 2)
        if not ranks.is_main:
            return out
        digests = write_flow_tables(out, frame, seed=seed)
        dropped = dropped_examples(frame)
        summary = {
            "arguments": arguments, **frame.attrs["settings"], "metric": metric,
            "controls": controls, **run_provenance(hooked), "window": frame.attrs["window"],
            "word_maps": word_maps,
            **({} if lens is None else {"tuned_lens": lens.digest}),
            "n_layers": hooked.cfg.n_layers, "n_examples": len(mine),
            "n_kept": int(frame.example_id.nunique()),
            "n_dropped": int((dropped["flow"] == "all").sum()),
            "world_size": ranks.world, "examples_per_rank": frame.attrs["examples_per_rank"],
            "sweep_seconds": sweep_seconds,
            "example_ids": [str(e.example_id) for e in examples],
        }
        if frame.empty:
            write_run_json(out, summary, digests)
            raise MMLensError(all_dropped_message(dropped, len(mine), out))
        if hooked.processor is not None:
            views = example_views(hooked, mine, frame.attrs["records"],
                                  resolved.prepare_options(), flow=frame,
                                  word_maps=word_maps)
            data = json.dumps(views).encode("utf-8")
            write_atomic(out / "views.json", data)
            digests["views.json"] = hashlib.sha256(data).hexdigest()[:16]
        write_run_json(out, {**summary, "seconds": round(time.time() - started, 1)}, digests)
    build_report(out)
    return out


def hook_shapes(model: HookedModel) -> list[tuple[str, tuple[int, ...]]]:
    """Every hook point of ``model`` with its activation's shape on a one-example prompt."""
    from PIL import Image

    # Families with dynamic resolution have no fixed size: any square shows every hook.
    size = getattr(model.cfg.vision, "image_size", 224)
    batch = model.prepare(Image.new("RGB", (size, size), (128, 128, 128)),
                          "What is in the image?")
    _, cache = model.run_with_cache(batch)
    return [(name, tuple(cache[name].shape)) for name in model.hook_dict if name in cache]
