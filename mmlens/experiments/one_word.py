"""The one-word study's part of a run folder: the knockout sweep, emergence, tables, example
views and report of the one-word tasks (``run_study`` routes them here, on the loaded model).

Writes ``run.json``, ``flow.jsonl`` (the resumable store), ``flow.csv``, ``summary.csv``,
``dropped.csv``, ``emergence.csv``, ``examples.jsonl``, ``views.json`` and ``report.html``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from mmlens.core.errors import MMLensError
from mmlens.experiments.controls import control_seed_of
from mmlens.experiments.presets import resolve_settings
from mmlens.experiments.provenance import run_provenance
from mmlens.experiments.report.views import example_views
from mmlens.experiments.run_options import torch_threads
from mmlens.experiments.runfolder.atomic import write_atomic
from mmlens.experiments.sweep import AllDroppedWarning, dropped_examples, information_flow
from mmlens.experiments.tables import (
    STORE_NAME,
    all_dropped_message,
    write_flow_tables,
    write_run_json,
)
from mmlens.model.protocol import HookedModel

SMALL_WIDTH = 1024
"""A model up to this ``d_model`` on the CPU runs on one thread unless told otherwise."""


def run_one_word(
    out: Path, examples: list[Any], *, hooked: HookedModel, model: str, data: str,
    tasks: Any, per_task: int | None, flow_names: list[str], window: int | None,
    device: str | None, dtype: str | None, seed: int, only_correct: bool,
    batch_size: int | str, progress: bool, threads: int | None,
    shard: tuple[int, int] | None, ranks: Any, max_memory: int | None, rescale_boxes: bool,
    preset: str | None, metric: str, controls: bool, control_seed: int | None,
    filter_max_new_tokens: int | None, word_maps: bool, tuned_lens: str | Path | None,
    settings: dict[str, Any],
) -> Path:
    """Sweep the one-word ``examples`` (all of them, or ``shard``'s share; dealt out over
    ``ranks``) on ``hooked`` and write their tables, views and report into ``out``; the
    arguments are ``run_study``'s, recorded in ``run.json``."""
    from mmlens.experiments.report.page import build_report
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
