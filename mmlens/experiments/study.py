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

This module routes: it checks the options (``run_options``), loads the examples
(``study_data``) and the model once, takes the folder's lock and the ranks, and hands the
one-word tasks to ``one_word.run_one_word`` and the free-form ones to
``answer_run.run_free_form``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmlens.core.errors import MMLensError
from mmlens.data.shapes_questions import FREE_FORM_TASKS
from mmlens.experiments.free_form.run import free_form_flows, is_answers_file
from mmlens.experiments.knockouts import DEFAULT_FLOWS, parse_flows
from mmlens.experiments.one_word import run_one_word
from mmlens.experiments.run_options import (
    check_count,
    check_device,
    default_out_dir,
    torch_threads,
)
from mmlens.experiments.runfolder.distributed import close_ranks, init_ranks, rank_device
from mmlens.experiments.runfolder.lock import FolderBusyError, RunLock
from mmlens.experiments.study_data import load_examples
from mmlens.model.protocol import HookedModel

DEFAULT_MODEL = "shapes-llava"
DEFAULT_PER_TASK = 60


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
    (``mmlens.experiments.free_form.run``) over ``answer_flows``, teacher-forced on the model's
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
            run_one_word(out, examples, hooked=hooked, model=model, data=data, tasks=tasks,
                         per_task=per_task, flow_names=flow_names, window=window,
                         device=rank_device(device, ranks), dtype=dtype, seed=seed,
                         only_correct=only_correct, batch_size=batch_size, progress=progress,
                         threads=threads, shard=shard, ranks=ranks, max_memory=max_memory,
                         rescale_boxes=rescale_boxes, preset=preset, metric=metric,
                         controls=controls, control_seed=control_seed,
                         filter_max_new_tokens=filter_max_new_tokens, word_maps=word_maps,
                         tuned_lens=tuned_lens, settings=settings)
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
    from mmlens.experiments.free_form.run import run_free_form
    from mmlens.experiments.report.page import build_report

    with torch_threads(threads if threads is not None else 1):
        run_free_form(out, free, flows=answer_flows,
                      forced="reference" if reference else "generated", **options)
    build_report(out)


def hook_shapes(model: HookedModel) -> list[tuple[str, tuple[int, ...]]]:
    """Every hook point of ``model`` with its activation's shape on a one-example prompt."""
    from PIL import Image

    # Families with dynamic resolution have no fixed size: any square shows every hook.
    size = getattr(model.cfg.vision, "image_size", 224)
    batch = model.prepare(Image.new("RGB", (size, size), (128, 128, 128)),
                          "What is in the image?")
    _, cache = model.run_with_cache(batch)
    return [(name, tuple(cache[name].shape)) for name in model.hook_dict if name in cache]
