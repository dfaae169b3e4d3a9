"""The free-form part of a run folder: ``mmlens flow --tasks Describe`` (or a mix of tasks).

    run_free_form(out, examples, model="shapes-llava", forced="generated", ...)

writes beside the one-word study's files: ``answer_flow.jsonl`` (the resumable store),
``answer_flow.csv`` (one row per example, flow, centre layer and answer token),
``answer_summary.csv`` (per example, flow and layer: ``seq_logprob_*``, ``norm_prob_*``,
``fg_tracer_change``), ``answer_peaks.csv`` (``flow_summary`` of each metric, bootstrap
intervals), ``answer_dropped.csv`` and ``answer_views.json``; then adds a ``free_form``
section (arguments, what was forced, the filter's rule, counts) and the tables' digests to
``run.json``, which ``check_run_folder`` verifies before a report is built.

``data`` a JSONL file of ``{image, prompt, reference, boxes?}`` (``--data answers.jsonl``,
``mmlens.data.answers_jsonl``) runs the same study on every line of the file; the file's
digest joins the store's signature beside the examples' (prompts, references, boxes, image
bytes), so a resume after the file changed is refused naming it.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mmlens.core.errors import MMLensError
from mmlens.experiments.free_form.study import (
    ANSWER_FLOWS,
    ANSWER_STORE,
    MAX_NEW_TOKENS,
    answer_study,
    answer_summary_frame,
    filter_rule,
)
from mmlens.experiments.presets import resolve_settings
from mmlens.experiments.provenance import run_provenance
from mmlens.experiments.runfolder.atomic import write_atomic
from mmlens.experiments.summary import flow_summary
from mmlens.experiments.tables import write_run_json, write_table
from mmlens.methods.answer_flow import source_span
from mmlens.model.protocol import HookedModel

BOXED_SPANS = ("related", "other")
"""Sources made from the examples' boxes: a file without boxes cannot have them."""

METRICS = {"norm_prob_change": "length-normalised probability, relative change (%)",
           "fg_tracer_change": "FG-TRACER's measure: the drops of the length-normalised "
                               "probability (%)",
           "seq_logprob_change": "change in the answer's log-probability (seq-logprob)"}
"""The per-answer measures summarised and drawn, with their axis titles."""


def is_answers_file(data: str | Path) -> bool:
    """``--data`` names a JSONL file of free-form answers (not ``shapes`` or a GQA folder)."""
    return str(data).endswith(".jsonl")


def answers_file_digest(path: str | Path) -> dict[str, str]:
    """The file's name and content digest, for the store's signature."""
    path = Path(path)
    return {"name": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16]}


def free_form_flows(examples: Sequence[Any], flows: Sequence[str] | str | None,
                    data: str | Path = "shapes") -> list[str]:
    """The flows to run: ``flows`` (a list, or comma-separated), by default ``ANSWER_FLOWS``;
    where no example has boxes, the default leaves out the flows from the boxes' spans and
    naming one is refused."""
    if isinstance(flows, str):
        flows = [flow.strip() for flow in flows.split(",") if flow.strip()]
    boxed = any(getattr(example, "boxes", None) for example in examples)
    if flows is None:
        flows = [flow for flow in ANSWER_FLOWS if boxed or source_span(flow) not in BOXED_SPANS]
    needing = [flow for flow in flows if source_span(flow) in BOXED_SPANS]
    if needing and not boxed:
        where = Path(data).name if is_answers_file(data) else "the data"
        raise MMLensError(f"{where} has no boxes: the flows {', '.join(needing)} block the "
                          "patches of the objects its lines' boxes mark; add \"boxes\": "
                          "[[x, y, w, h], ...] to its lines, or pass --answer-flows "
                          "image->answer,question->answer")
    return list(flows)


def answer_peaks(summary: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """``flow_summary`` (peak layer, peak change, half range, bootstrap intervals) of each
    measure in ``METRICS``, per task and flow, stacked with a ``metric`` column."""
    return pd.concat([flow_summary(summary, value=metric, seed=seed).assign(metric=metric)
                      for metric in METRICS], ignore_index=True)


def write_answer_tables(out: Path, frame: pd.DataFrame, seed: int = 0) -> dict[str, str]:
    """The free-form tables of the module docstring; their digests."""
    summary = answer_summary_frame(frame)
    dropped = pd.DataFrame(frame.attrs["dropped"], columns=["example_id", "task", "flow",
                                                            "reason"])
    digests = dict([write_table(out, "answer_flow.csv", frame),
                    write_table(out, "answer_summary.csv", summary),
                    write_table(out, "answer_dropped.csv", dropped)])
    if not frame.empty:
        digests.update([write_table(out, "answer_peaks.csv", answer_peaks(summary, seed))])
    return digests


def run_free_form(out: Path, examples: Sequence[Any], *, model: str, flows: Sequence[str],
                  forced: str, only_correct: bool, window: int | None, device: str | None,
                  dtype: str | None, seed: int, progress: bool, preset: str | None,
                  filter_max_new_tokens: int | None, settings: dict[str, Any],
                  data: str | Path = "shapes", hooked: HookedModel | None = None,
                  shard: tuple[int, int] | None = None) -> Path:
    """Run the free-form study on ``examples`` into ``out`` and record it in ``run.json``;
    ``hooked``: the model ``model`` already loaded (a mixed run loads it once); ``shard``:
    only the K-th of N shares of the examples (``mmlens merge`` joins the shards)."""
    from mmlens.experiments.report.views import example_views
    from mmlens.model.hooked import HookedMultimodalTransformer

    if hooked is None:
        hooked = HookedMultimodalTransformer.from_pretrained(model, dtype=dtype, device=device)
    data = str(data)
    signed = {"answers_file": answers_file_digest(data)} if is_answers_file(data) else {}
    resolved = resolve_settings(hooked, preset, window=window, **settings)
    print(f"mmlens: free-form answers ({forced}), {resolved.describe()}", file=sys.stderr)
    started = time.time()
    frame = answer_study(hooked, examples, settings=resolved, flows=flows, forced=forced,
                         only_correct=only_correct, store=out / ANSWER_STORE,
                         max_new_tokens=filter_max_new_tokens or MAX_NEW_TOKENS,
                         progress=progress, signature=signed, shard=shard)
    digests = write_answer_tables(out, frame, seed)
    records = frame.attrs["records"]
    n_kept = int(frame["example_id"].nunique())
    mine = list(examples) if shard is None else list(examples)[shard[0]::shard[1]]
    if hooked.processor is not None and n_kept:
        views = example_views(hooked, mine, records, resolved.prepare_options())
        written = json.dumps(views).encode("utf-8")
        write_atomic(out / "answer_views.json", written)
        digests["answer_views.json"] = hashlib.sha256(written).hexdigest()[:16]
    section = {
        "arguments": {"model": model, "data": data,
                      "tasks": sorted({str(e.task) for e in examples}),
                      "flows": list(flows), "forced": forced, "only_correct": only_correct,
                      "window": window, "seed": seed,
                      "shard": None if shard is None else list(shard)},
        "forced": forced, "filter": filter_rule(forced, only_correct),
        "window": resolved.window, "n_layers": hooked.cfg.n_layers,
        "n_examples": len(mine), "n_kept": n_kept,
        "n_dropped": sum(1 for r in records if r.get("dropped")),
        "seconds": round(time.time() - started, 1),
        "example_ids": [str(e.example_id) for e in examples],
    }
    run_file = out / "run.json"
    summary = json.loads(run_file.read_text()) if run_file.is_file() else {
        "arguments": {"model": model, "data": data, "seed": seed,
                      "shard": None if shard is None else list(shard)},
        **run_provenance(hooked), "window": resolved.window,
        "n_layers": hooked.cfg.n_layers}
    tables = {name: digest for name, digest in summary.pop("tables", {}).items()
              if not name.startswith("answer_")}
    write_run_json(out, {**summary, "free_form": section}, {**tables, **digests})
    if not n_kept:
        reasons = sorted({str(r["dropped"]) for r in records if r.get("dropped")})
        raise MMLensError(f"all {len(mine)} free-form examples were dropped (e.g. "
                          f"{reasons[0] if reasons else 'no flows'}); see "
                          f"{out / 'answer_dropped.csv'}; pass --no-filter to keep answers "
                          "that differ from the reference, or --reference to force it")
    return out


__all__ = ["ANSWER_FLOWS", "answer_peaks", "answers_file_digest", "free_form_flows",
           "is_answers_file", "run_free_form", "write_answer_tables"]
