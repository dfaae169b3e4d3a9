"""``information_flow``: the paper's attention-knockout sweep over examples, flows and layers.

    df = information_flow(model, examples)                 # the six flows, every centre layer
    df.groupby(["flow", "layer"]).rel_change.mean()
    dropped_examples(df)                                   # examples left out, and why

Per example: one clean run (the image encoded once), the correctness filter (greedy decode,
``strip().lower()`` equal to the gold answer), then every (flow, centre layer) knockout by the
fast engine (``method="fast"``) or one full forward each (``method="naive"``). The
same clean run gives the answer-emergence readings (``lens=True``) and the example's
provenance. With ``store`` the results are appended to disk per example and a restarted run
resumes.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from mmlens.core.errors import MMLensError
from mmlens.data.example import BoxOutsideImageError
from mmlens.experiments.answer_forms import paired_tokens
from mmlens.experiments.controls import control_seed_of, control_spans
from mmlens.experiments.correctness import model_answer, wrong_answer_reason
from mmlens.experiments.emergence import answer_variants, lens_record
from mmlens.experiments.engine import clean_run, fast_knockout_probs
from mmlens.experiments.examples import ExampleSource
from mmlens.experiments.knockouts import (
    DEFAULT_FLOWS,
    Flow,
    check_flow_spans,
    flow_spans,
    parse_flows,
    window_knockouts,
)
from mmlens.experiments.metrics import METRICS, results_frame
from mmlens.experiments.naive import naive_knockout_probs
from mmlens.experiments.presets import StudySettings, resolve_settings
from mmlens.experiments.runfolder.distributed import Ranks, StoreProgress, current_ranks
from mmlens.experiments.runfolder.fingerprint import spans_digest, study_signature, template_digest
from mmlens.experiments.runfolder.store import ResultStore, read_store
from mmlens.inputs.batch import MultimodalBatch
from mmlens.inputs.image_tokens import tokenized_text
from mmlens.methods.tuned_lens import TunedLens
from mmlens.model.protocol import HookedModel

__all__ = ["dropped_examples", "information_flow", "model_answer", "results_frame"]

METHODS = ("fast", "naive")
ExtraSpans = Mapping[str, Mapping[str, Sequence[int]]] | Callable[..., Mapping[str, Any]]


def information_flow(
    model: HookedModel,
    examples: Sequence[Any] | MultimodalBatch,
    *,
    flows: Iterable[str | Flow] | str = DEFAULT_FLOWS,
    window: int | None = None,
    only_correct: bool = True,
    method: str = "fast",
    store: str | Path | None = None,
    batch_size: int | str = 64,
    max_memory: int | None = None,
    progress: bool = True,
    spans: ExtraSpans | None = None,
    preset: str | StudySettings | None = None,
    template: Any = None,
    preprocessing: str | None = None,
    tokenization: str | None = None,
    related_rule: str | None = None,
    empty_spans: str | None = None,
    metric: str = "prob",
    controls: bool = False,
    seed: int = 0,
    control_seed: int | None = None,
    lens: bool = False,
    tuned_lens: TunedLens | None = None,
    max_new_tokens: int | None = None,
    shard: tuple[int, int] | None = None,
    ranks: Ranks | None = None,
) -> pd.DataFrame:
    """Knock out each flow in the window around each centre layer; one row per example x flow
    x centre layer.

    ``examples``: dataset ``Example`` records (prepared one at a time) or a ``MultimodalBatch``
    (then ``only_correct=False`` unless it carries ``examples``). ``flows``: ``"SRC->DST"`` of
    span names. ``spans``: extra spans per example, ``{example_id: {name: positions}}`` or a
    callable ``(example, spans) -> {name: positions}``; positions index the unpadded prompt.

    ``preset`` and the settings after it (``window``, ``template``, ``preprocessing``,
    ``tokenization``, ``related_rule``, ``empty_spans``) are resolved by
    ``mmlens.experiments.presets.resolve_settings``: a paper preset is found from the model's
    name or config unless ``preset="none"``; each keyword given overrides it.
    ``empty_spans="skip"`` leaves a flow out for an example whose span is empty (listed by
    ``dropped_examples``); ``"zero"`` (the paper's) writes its rows with ``p_block = p_base``.
    ``metric``: ``"prob"`` (the paper's relative change, column ``rel_change``), ``"logprob"``
    or ``"logit-diff"`` (answer vs the wrong option; adds ``metric_base``, ``metric_block``,
    ``change``). ``controls``: add a random control per flow (``mmlens.experiments.controls``),
    drawn from ``control_seed`` (default: ``seed``). ``lens``: keep each kept example's
    answer-emergence readings (``emergence_frame(df.attrs["records"])``), with ``tuned_lens``
    (a ``TunedLens``) also its ``tuned`` reading (the lens's digest joins the store's
    signature).
    ``max_new_tokens``: how far the correctness filter decodes (default 128, the paper's).
    When every example is dropped the frame is empty and a warning gives the count per reason.

    Columns: ``example_id, task, flow, layer, window_start, window_end`` (the blocked layers
    are ``window_start .. window_end - 1``: ``window_end`` is exclusive) ``, answer_token,
    answer, p_base, p_block, rel_change`` (percent). ``df.attrs["records"]`` holds the stored
    per-example records (with provenance), ``df.attrs["settings"]`` the resolved settings.
    ``batch_size``: knockouts run together, or ``"auto"`` to fit ``max_memory`` bytes (default:
    the device's free memory).

    ``shard=(K, N)``: only examples ``K, K+N, K+2N...`` (a job-array share; the store's
    signature still covers every example, so shards of one study can be merged). In a
    ``torch.distributed`` group (``ranks``, default: the group joined, if any) the examples not
    yet in the store are dealt out over the ranks; every rank returns the whole table.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {METHODS}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: use one of {METRICS}")
    if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
    flows = parse_flows(flows)
    settings = resolve_settings(model, preset, template=template, preprocessing=preprocessing,
                                tokenization=tokenization, related_rule=related_rule,
                                empty_spans=empty_spans, window=window,
                                control_seed=control_seed_of(controls, control_seed, seed),
                                filter_max_new_tokens=max_new_tokens)
    source = ExampleSource(model, examples, spans, **settings.prepare_options())
    if only_correct:
        source.check_gold_answers()
    if tuned_lens is not None and not lens:
        raise MMLensError("tuned_lens= adds a reading to answer emergence: pass lens=True too")
    if lens and model.tokenizer is None:
        raise ValueError("lens=True tracks answer words, but this model has no tokenizer: "
                         "load it with from_pretrained")
    check_flow_spans(flows, flow_spans(_first_usable(source).spans[0], model, flows))
    options = {"flows": flows, "settings": settings, "only_correct": only_correct,
               "method": method, "batching": (batch_size, max_memory),
               "max_new_tokens": settings.filter_max_new_tokens,
               "wrong": metric == "logit-diff", "controls": controls,
               "seed": settings.control_seed, "lens": lens, "tuned": tuned_lens}
    ranks = ranks or current_ranks()
    indices = list(range(len(source)))
    if shard is not None:
        indices = indices[shard[0]::shard[1]]
    results = None
    if store is not None:
        record = settings.record()
        record.pop("preset_source")  # how the preset was found may name the model's folder
        signature = {
            **study_signature(model, source.digests()),
            "flows": [f.name for f in flows], "only_correct": only_correct,
            "extra_spans": spans_digest(spans), **record,
            "template": template_digest(settings.template),
            "metric_tokens": "answer and foil, produced form" if options["wrong"] else "answer",
            "controls": controls, "lens": lens,  # control seed, filter length: in record
            **({} if tuned_lens is None else {"tuned_lens": tuned_lens.digest}),
        }
        results = ResultStore.open(store, signature, writer=ranks.rank, part=shard)
        ranks.barrier()  # every rank has read the store before any appends to it
    done = {} if results is None else results.done
    todo = ranks.mine([i for i in indices if source.example_id(i) not in done])
    progress_of_others = (StoreProgress(store, results.path)
                          if results is not None and ranks.world > 1 else None)
    computed = {}
    bar = tqdm(total=len(indices), initial=sum(source.example_id(i) in done for i in indices),
               disable=not progress or not ranks.is_main, desc="information flow", unit="ex")
    for index in todo:
        record = _one_example(model, source, index, **options)
        if results is not None:
            results.append(record)
        computed[record["example_id"]] = record
        bar.update(1 + (progress_of_others.new_records() if progress_of_others else 0))
    counts = ranks.gather(len(todo))
    if ranks.world > 1:
        ranks.barrier()  # every share is complete
        if results is not None:
            done = read_store(store)[1]
        else:
            for part in ranks.gather(computed):
                computed.update(part)
    bar.update(len(indices) - bar.n)
    bar.close()
    everything = {**done, **computed}
    records = [everything[source.example_id(i)] for i in indices]
    frame = results_frame(records, flows, settings.window, model.cfg.n_layers, metric=metric)
    frame.attrs["records"] = SharedRecords(records)
    frame.attrs["settings"] = settings.record()
    frame.attrs["examples_per_rank"] = counts
    if frame.empty and records:
        _warn_all_dropped(frame, len(records))
    return frame


class AllDroppedWarning(UserWarning):
    """Every example was left out: ``information_flow`` returned an empty table."""


def drop_counts(dropped: pd.DataFrame) -> Counter:
    """How many whole examples were left out, per kind of reason (``"wrong answer"``...)."""
    whole = dropped[dropped["flow"] == "all"]
    return Counter(" ".join(str(reason).split(" ")[:2]) for reason in whole["reason"])


def _warn_all_dropped(frame: pd.DataFrame, n_examples: int) -> None:
    kinds = drop_counts(dropped_examples(frame))
    why = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common()) or (
        "every flow's span was empty")
    advice = []
    if kinds.get("wrong answer"):
        advice.append("pass only_correct=False to keep the examples the model answers wrongly")
    if not kinds or any(kind.startswith("empty span") for kind in kinds):
        advice.append("choose flows whose spans the examples have")
    warnings.warn(f"all {n_examples} examples were dropped ({why}), so the table is empty; "
                  "dropped_examples(df) gives each one's reason" + "".join(
                      f"; {a}" for a in advice), AllDroppedWarning, stacklevel=3)


def _first_usable(source: ExampleSource) -> MultimodalBatch:
    """The first example that prepares (one whose box misses its image is dropped later)."""
    for index in range(len(source)):
        try:
            return source.prepare(index)
        except BoxOutsideImageError:
            continue
    return source.prepare(0)  # every example is unusable: raise the first one's reason


class SharedRecords(list):
    """The stored records, shared rather than copied: pandas deep-copies ``attrs`` on every
    operation, which for a long run's records would cost far more than the sweep."""

    def __deepcopy__(self, memo: dict) -> SharedRecords:
        return self


def _one_example(model: HookedModel, source: ExampleSource, index: int, *, flows: list[Flow],
                 settings: StudySettings, only_correct: bool, method: str,
                 batching: tuple[int | str, int | None],
                 max_new_tokens: int, wrong: bool, controls: bool, seed: int | None,
                 lens: bool, tuned: TunedLens | None) -> dict[str, Any]:
    example_id, task = source.example_id(index), source.task(index)
    try:
        example = source.prepare(index)
    except BoxOutsideImageError as err:  # the data's own box misses its image: nothing to block
        return {"example_id": example_id, "task": task,
                "dropped": f"box outside the image: {err}"}
    spans = flow_spans(example.spans[0], model, flows)
    check_flow_spans(flows, spans)
    record: dict[str, Any] = {"example_id": example_id, "task": task,
                              "provenance": _provenance(source, index, example)}
    clean = clean_run(model, example)
    token = clean.prediction(exclude=model.cfg.image_token_id)
    gold = source.gold(index) if source.records is not None else None
    if model.tokenizer is not None and gold is not None:
        record["model_answer"] = model_answer(model, clean, token, gold, max_new_tokens)
    if only_correct:
        reason = wrong_answer_reason(record["model_answer"], gold)
        if reason is not None:
            return {**record, "dropped": reason}
    # An empty span (no related patches: the objects are absent) either skips that flow for
    # this example, or (the paper's way) blocks nothing, so the flow's rows equal p_base.
    empty = {flow.name: f"empty span {name!r}" for flow in flows
             for name in (flow.target, flow.source) if len(spans[name]) == 0}
    skipped = empty if settings.empty_spans == "skip" else {}
    run = [flow for flow in flows if flow.name not in empty]
    if controls:
        spans, extra = control_spans(run, spans, example_id=example_id, seed=seed)
        record["provenance"]["spans"].update(
            {flow.source: [int(p) for p in spans[flow.source]] for flow in extra})
        run += extra
    if not run and skipped:
        return {**record, "dropped": "; ".join(sorted(set(skipped.values())))}
    tokens = [token]
    record_wrong = getattr(source.records[index], "wrong_answer", None) if source.records else None
    if wrong and record_wrong and gold is not None:
        answer_id, foil_id = paired_tokens(model.tokenizer, token, gold, record_wrong)
        if foil_id is not None:
            tokens += [answer_id, foil_id]
    cross = bool(model.cfg.text.cross_attention_layers)
    cells = window_knockouts(run, spans, settings.window, model.cfg.n_layers,
                             cross_attention=cross, key_spans=example.key_spans)
    knockouts = [cell.knockout for cell in cells]
    if not knockouts:
        probs = clean.logits.softmax(-1)[tokens][None].cpu()[:0]
    elif method == "fast":
        probs = fast_knockout_probs(model, clean, knockouts, tokens, batch_size=batching[0],
                                    max_memory=batching[1])
    else:
        probs = naive_knockout_probs(model, example, knockouts, tokens)
    base = clean.logits.softmax(-1)[tokens].tolist()
    p_block: dict[str, list] = {flow.name: [] for flow in run}
    for cell, prob in zip(cells, probs.tolist(), strict=True):
        p_block[cell.flow].append(prob)
    for name in empty if settings.empty_spans == "zero" else ():
        p_block[name] = [base] * model.cfg.n_layers
    answer = model.tokenizer.decode([token]) if model.tokenizer is not None else str(token)
    record.update({"answer_token": token, "answer": answer, "p_base": base[0],
                   "p_block": {name: [p[0] for p in rows] for name, rows in p_block.items()},
                   "skipped": skipped, "zeroed": sorted(empty) if not skipped else []})
    if len(tokens) > 1:  # logit-diff: the answer and the wrong option in the produced form
        record.update({"metric_tokens": {"answer": tokens[1], "foil": tokens[2]},
                       "p_metric_base": base[1:],
                       "p_metric_block": {n: [p[1:] for p in rows] for n, rows in p_block.items()}})
    if lens and gold is not None:
        record["lens"] = lens_record(model, clean, answer_variants(model, gold, record_wrong),
                                     tuned)
    return record


def _provenance(source: ExampleSource, index: int, example: MultimodalBatch) -> dict[str, Any]:
    """What the model was given: the text the tokenizer received, its ids, the image size
    and the spans."""
    prompt = (example.prompts or [None])[0]
    input_ids = example.input_ids[0].tolist()
    tokenizer = getattr(source.model.processor, "tokenizer", None)
    if prompt is not None and tokenizer is not None:
        image_token_id = source.model.cfg.image_token_id
        prompt = tokenized_text(prompt, tokenizer, image_token_id,
                                input_ids.count(image_token_id),
                                source.prepare_options.get("tokenization", "whole"))
    size = source.image_sizes.get(index)
    gold = source.gold(index) if source.records is not None and hasattr(
        source.records[index], "answer") else None
    record = source.records[index] if source.records is not None else None
    return {"prompt": prompt, "input_ids": input_ids, "answer": gold,
            "image_size": list(size) if size is not None else None,
            "exif_orientation": getattr(record, "exif_orientation", None),
            "spans": {name: [int(p) for p in positions]
                      for name, positions in example.spans[0].items()}}


def dropped_examples(frame: pd.DataFrame) -> pd.DataFrame:
    """What an ``information_flow`` result left out: ``example_id, task, flow, reason``.

    ``flow`` is ``"all"`` for an example left out entirely (e.g. answered wrongly), else the
    one flow it could not take part in (e.g. an empty ``related`` span).
    """
    return pd.DataFrame(frame.attrs.get("dropped", []),
                        columns=["example_id", "task", "flow", "reason"])
