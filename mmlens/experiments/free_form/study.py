"""The study on free-form answers: flows into every token of the answer, per example resumable.

    frame = answer_study(model, examples, store="runs/x/answer_flow.jsonl")
    answer_summary_frame(frame)       # per example, flow, layer: seq-logprob, normalised change

Per example: the model's greedy answer (``mmlens.methods.answer_flow.answer_tokens``); the
correctness filter keeps it when it equals the reference (``strip().lower()``, as the
one-word study's); then ``answer_flow`` teacher-forces the answer and blocks each flow
(``SPAN->answer``: image, question, related and other image patches) in the window around
every centre layer. ``forced="generated"`` (default) forces the model's own answer;
``"reference"`` forces the dataset's reference instead, in the case the model writes its
answers in (``mmlens.experiments.answer_forms``), and filters nothing. A flow whose source
span is empty for an example (no related patches) is skipped for it, and listed; so is
``other`` where ``related`` is empty (it would be the whole image).

With ``store`` each example's rows are one line of a ``ResultStore`` (row checks, and a
signature that includes ``forced``: a folder of generated answers refuses a run that forces
references), so a killed run resumes without losing or repeating an example.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from mmlens.core.errors import MMLensError
from mmlens.experiments.answer_forms import CASES, answer_form
from mmlens.experiments.correctness import wrong_answer_reason
from mmlens.experiments.examples import ExampleSource
from mmlens.experiments.presets import StudySettings
from mmlens.experiments.runfolder.fingerprint import study_signature, template_digest
from mmlens.experiments.runfolder.store import ResultStore
from mmlens.methods.answer_flow import answer_flow, answer_summary, answer_tokens, source_span
from mmlens.model.protocol import HookedModel

ANSWER_FLOWS: tuple[str, ...] = ("image->answer", "question->answer", "related->answer",
                                 "other->answer")
"""The free-form study's default flows: into the positions predicting the answer's tokens."""
FORCED = ("generated", "reference")
ANSWER_STORE = "answer_flow.jsonl"
MAX_NEW_TOKENS = 32
ROW_COLUMNS = ["example_id", "task", "answer", "flow", "layer", "index", "token", "word",
               "logprob_base", "logprob_block"]


def filter_rule(forced: str, only_correct: bool) -> str:
    """What the free-form correctness filter keeps, in words (for ``run.json``)."""
    if forced == "reference":
        return "none: the reference is forced (--reference)"
    if not only_correct:
        return "none (--no-filter): every generated answer is kept"
    return "the generated answer equals the reference (strip, lowercase)"


def answer_study(model: HookedModel, examples: Sequence[Any], *, settings: StudySettings,
                 flows: Sequence[str] = ANSWER_FLOWS, forced: str = "generated",
                 only_correct: bool = True, store: str | Path | None = None,
                 max_new_tokens: int = MAX_NEW_TOKENS, progress: bool = True,
                 signature: dict[str, Any] | None = None,
                 shard: tuple[int, int] | None = None) -> pd.DataFrame:
    """One row per kept example, flow, centre layer and answer token (``ROW_COLUMNS``);
    ``frame.attrs["records"]`` the stored records, ``["dropped"]`` what was left out.
    ``signature``: more entries for the store's signature (e.g. the data file's digest).
    ``shard=(K, N)``: only examples ``K, K+N, ...``; the signature still covers every
    example, so ``mmlens merge`` joins the shards."""
    if forced not in FORCED:
        raise MMLensError(f"forced={forced!r}: use 'generated' (the model's own answer) or "
                          "'reference' (the dataset's)")
    if model.tokenizer is None:
        raise MMLensError("the free-form study decodes answers: load the model with its "
                          "tokenizer (from_pretrained)")
    for flow in flows:
        source_span(flow)
    source = ExampleSource(model, list(examples), **settings.prepare_options())
    results = None
    if store is not None:
        record = settings.record()
        record.pop("preset_source")
        signature = {**study_signature(model, source.digests()), "kind": "answer_flow",
                     "flows": list(flows), "forced": forced,
                     "only_correct": only_correct and forced == "generated",
                     "max_new_tokens": max_new_tokens, **record,
                     "template": template_digest(settings.template), **(signature or {})}
        results = ResultStore.open(store, signature, part=shard)
    done = {} if results is None else results.done
    records = []
    indices = range(len(source)) if shard is None else range(shard[0], len(source), shard[1])
    for index in tqdm(indices, disable=not progress, desc="answer flow", unit="ex"):
        example_id = source.example_id(index)
        if example_id not in done:
            row = _one_example(model, source, index, flows=flows, window=settings.window,
                               forced=forced, only_correct=only_correct,
                               max_new_tokens=max_new_tokens)
            if results is not None:
                results.append(row)
            done = {**done, example_id: row} if results is None else results.done
        records.append(done[example_id])
    return answer_frame(records)


def _one_example(model: HookedModel, source: ExampleSource, index: int, *, flows, window: int,
                 forced: str, only_correct: bool, max_new_tokens: int) -> dict[str, Any]:
    example_id, task, gold = source.example_id(index), source.task(index), source.gold(index)
    one = source.prepare(index)
    record: dict[str, Any] = {"example_id": example_id, "task": task, "reference": gold,
                              "model_answer": "", "forced": forced}
    try:
        generated = answer_tokens(model, one, None, max_new_tokens)
    except MMLensError:  # the model ended its answer at once
        return {**record, "dropped": "empty answer (the model ended at once)"}
    said = model.tokenizer.decode(generated.tolist(), skip_special_tokens=True)
    record["model_answer"] = said
    if forced == "generated" and only_correct:
        reason = wrong_answer_reason(said, gold)
        if reason is not None:
            return {**record, "dropped": reason}
    ids = generated
    if forced == "reference":
        case, space = answer_form(model.tokenizer, int(generated[0]), gold)
        ids = answer_tokens(model, one, space + CASES[case](gold.strip()), max_new_tokens)
    record["skipped"] = _skipped(one.spans[0], flows)
    run = [flow for flow in flows if flow not in record["skipped"]]
    if not run:
        return {**record, "dropped": "; ".join(sorted(set(record["skipped"].values())))}
    frame = answer_flow(model, one, answer_ids=[ids], flows=run, window=window)
    words = [model.tokenizer.decode([int(token)]) for token in ids]
    base = frame[frame["flow"] == run[0]].groupby("index")["logprob_base"].first()
    blocked = {flow: rows.pivot(index="layer", columns="index", values="logprob_block")
               .to_numpy().tolist() for flow, rows in frame.groupby("flow", sort=False)}
    return {**record, "answer": str(frame["answer"].iloc[0]), "tokens": ids.tolist(),
            "words": words, "logprob_base": base.tolist(), "logprob_block": blocked}


def _skipped(spans: dict[str, Any], flows: Sequence[str]) -> dict[str, str]:
    """The flows an example cannot run, and why: an empty source span, or ``other`` where
    ``related`` is empty (no boxes: it would be the whole image, ``image->answer`` again)."""
    def size(name: str) -> int:
        return len(spans.get(name, [1]))

    skipped = {}
    for flow in flows:
        name = source_span(flow)
        if size(name) == 0:
            skipped[flow] = f"empty span {name!r}"
        elif name == "other" and size("related") == 0:
            skipped[flow] = "no related patches (no boxes): 'other' would be the whole image"
    return skipped


def answer_frame(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The token rows of the stored ``records`` (``ROW_COLUMNS``), flows in stored order."""
    rows, dropped = [], []
    for record in records:
        if record.get("dropped"):
            dropped.append((record["example_id"], record["task"], "all", record["dropped"]))
            continue
        dropped += [(record["example_id"], record["task"], flow, why)
                    for flow, why in record.get("skipped", {}).items()]
        blocked = record["logprob_block"]
        n_layers = len(next(iter(blocked.values())))
        for layer in range(n_layers):  # as answer_flow orders them: layer, flow, token
            for flow, layers in blocked.items():
                rows += [(record["example_id"], record["task"], record["answer"], flow, layer,
                          index, token, word, base, value)
                         for index, (token, word, base, value) in enumerate(zip(
                             record["tokens"], record["words"], record["logprob_base"],
                             layers[layer], strict=True))]
    frame = pd.DataFrame(rows, columns=ROW_COLUMNS)
    frame.attrs["records"] = list(records)
    frame.attrs["dropped"] = dropped
    return frame


def answer_summary_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """``answer_summary`` of the study's token rows, per example (``example_id``, ``task``)."""
    renamed = frame.rename(columns={"example_id": "example"})
    summary = answer_summary(renamed.drop(columns=["task", "word"]))
    tasks = frame.drop_duplicates("example_id").set_index("example_id")["task"]
    summary = summary.rename(columns={"example": "example_id"})
    summary.insert(1, "task", summary["example_id"].map(tasks))
    return summary


def per_token_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Each answer token's change in log-probability, with its place as the curve's name
    (``flow`` column ``"image->answer, token 2"``), for ``knockout_curves``."""
    change = frame["logprob_block"] - frame["logprob_base"]
    named = frame["flow"] + ", token " + frame["index"].astype(str)
    return frame.assign(token_flow=named, logprob_change=change)
