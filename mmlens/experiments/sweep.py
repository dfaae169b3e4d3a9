"""``information_flow``: the paper's attention-knockout sweep over examples, flows and layers.

    df = information_flow(model, examples)                 # the six flows, every centre layer
    df.groupby(["flow", "layer"]).rel_change.mean()
    dropped_examples(df)                                   # examples left out, and why

Per example: one clean run (the image encoded once), the correctness filter (greedy decode,
``strip().lower()`` equal to the gold answer), then every (flow, centre layer) knockout by the
fast engine (``method="fast"``) or one full forward each (``method="naive"``). With ``store``
the results are appended to disk per example and a restarted run resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from mmlens.experiments.distributed import Ranks, StoreProgress, current_ranks
from mmlens.experiments.engine import (
    CleanRun,
    clean_run,
    fast_knockout_probs,
    greedy_continue,
)
from mmlens.experiments.examples import ExampleSource, model_fingerprint
from mmlens.experiments.fingerprint import (
    METRIC,
    code_digest,
    config_digest,
    processor_digest,
    spans_digest,
    template_digest,
    weights_checksum,
)
from mmlens.experiments.knockouts import (
    DEFAULT_FLOWS,
    Flow,
    check_flow_spans,
    check_window,
    parse_flows,
    window_knockouts,
)
from mmlens.experiments.naive import naive_knockout_probs
from mmlens.experiments.store import ResultStore, read_store
from mmlens.inputs.batch import MultimodalBatch
from mmlens.methods.windows import window_layers
from mmlens.model.protocol import HookedModel

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
    template: Any = None,
    preprocessing: str | None = None,
    max_new_tokens: int = 8,
    shard: tuple[int, int] | None = None,
    ranks: Ranks | None = None,
) -> pd.DataFrame:
    """Knock out each flow in the window around each centre layer; one row per example x flow
    x centre layer.

    ``examples``: dataset ``Example`` records (prepared one at a time) or a ``MultimodalBatch``
    (then ``only_correct=False`` unless it carries ``examples``). ``flows``: ``"SRC->DST"`` of
    span names. ``window``: layers per knockout (default ``default_window``). ``spans``: extra
    spans per example, ``{example_id: {name: positions}}`` or a callable
    ``(example, spans) -> {name: positions}``; positions index the example's unpadded prompt.
    ``template`` / ``preprocessing``: how ``Example`` records are prepared (see
    ``mmlens.experiments.presets`` for the paper's per-model choices; default: the processor's own).

    Columns: ``example_id, task, flow, layer, window_start, window_end, answer_token, answer,
    p_base, p_block, rel_change`` (percent). What was left out is in ``df.attrs["dropped"]``;
    ``dropped_examples(df)`` gives it as a table ``example_id, task, flow, reason``: examples
    answered wrongly (``flow="all"``), and an example's flows with an empty span (e.g. no
    ``related`` patches when the question's objects are absent), which only that flow skips.

    ``shard=(K, N)``: only examples ``K, K+N, K+2N...`` (a job-array share; the store's
    signature still covers every example, so shards of one study can be merged). In a
    ``torch.distributed`` group (``ranks``, default: the group joined, if any) the examples not
    yet in the store are dealt out over the ranks; every rank returns the whole table.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {METHODS}")
    if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
    flows = parse_flows(flows)
    n_layers = model.cfg.n_layers
    window = check_window(window, n_layers)
    source = ExampleSource(model, examples, spans, template=template,
                           preprocessing=preprocessing)
    if only_correct:
        source.check_gold_answers()
    check_flow_spans(flows, source.prepare(0).spans[0])
    ranks = ranks or current_ranks()
    indices = list(range(len(source)))
    if shard is not None:
        indices = indices[shard[0]::shard[1]]
    results = None
    if store is not None:
        signature = {
            "kind": "information_flow", "model": model_fingerprint(model),
            "weights": weights_checksum(model), "config": config_digest(model),
            "processor": processor_digest(model), **source.digests(),
            "span_rule": code_digest(), "metric": METRIC,
            "flows": [f.name for f in flows], "window": window, "only_correct": only_correct,
            "extra_spans": spans_digest(spans),
            "template": template_digest(template), "preprocessing": preprocessing,
            "max_new_tokens": max_new_tokens,
        }
        results = ResultStore.open(store, signature, writer=ranks.rank)
        ranks.barrier()  # every rank has read the store before any appends to it
    done = {} if results is None else results.done
    todo = ranks.mine([i for i in indices if source.example_id(i) not in done])
    progress_of_others = (StoreProgress(store, results.path)
                          if results is not None and ranks.world > 1 else None)
    computed = {}
    bar = tqdm(total=len(indices), initial=sum(source.example_id(i) in done for i in indices),
               disable=not progress or not ranks.is_main, desc="information flow", unit="ex")
    for index in todo:
        record = _one_example(model, source, index, flows, window, only_correct, method,
                              (batch_size, max_memory), max_new_tokens)
        if results is not None:
            results.append(record)
        computed[record["example_id"]] = record
        bar.update(1 + (progress_of_others.new_records() if progress_of_others else 0))
    counts = ranks.gather(len(todo))
    if ranks.world > 1:
        ranks.barrier()  # every shard is complete
        if results is not None:
            done = read_store(store)[1]
        else:
            for part in ranks.gather(computed):
                computed.update(part)
    bar.update(len(indices) - bar.n)
    bar.close()
    everything = {**done, **computed}
    records = [everything[source.example_id(i)] for i in indices]
    frame = results_frame(records, flows, window, n_layers)
    frame.attrs["examples_per_rank"] = counts
    return frame


def _one_example(model: HookedModel, source: ExampleSource, index: int, flows: list[Flow],
                 window: int, only_correct: bool, method: str,
                 batching: tuple[int | str, int | None],
                 max_new_tokens: int) -> dict[str, Any]:
    example_id, task = source.example_id(index), source.task(index)
    example = source.prepare(index)
    spans = example.spans[0]
    check_flow_spans(flows, spans)
    # A flow with an empty span (no related patches: the objects are absent) skips this
    # example; the other flows keep it.
    skipped = {flow.name: f"empty span {name!r}" for flow in flows
               for name in (flow.target, flow.source) if len(spans[name]) == 0}
    flows = [flow for flow in flows if flow.name not in skipped]
    if not flows:
        return {"example_id": example_id, "task": task,
                "dropped": "; ".join(sorted(set(skipped.values())))}
    clean = clean_run(model, example)
    token = clean.prediction(exclude=model.cfg.image_token_id)
    if only_correct:
        said = model_answer(model, clean, token, source.gold(index), max_new_tokens)
        if said.strip().lower() != source.gold(index).strip().lower():
            return {"example_id": example_id, "task": task,
                    "dropped": f"wrong answer {said.strip()!r} (gold {source.gold(index)!r})"}
    cells = window_knockouts(flows, spans, window, model.cfg.n_layers)
    knockouts = [cell.knockout for cell in cells]
    if method == "fast":
        probs = fast_knockout_probs(model, clean, knockouts, token, batch_size=batching[0],
                                    max_memory=batching[1])
    else:
        probs = naive_knockout_probs(model, example, knockouts, token)
    p_block: dict[str, list[float]] = {flow.name: [] for flow in flows}
    for cell, prob in zip(cells, probs.tolist(), strict=True):
        p_block[cell.flow].append(prob)
    answer = model.tokenizer.decode([token]) if model.tokenizer is not None else str(token)
    return {"example_id": example_id, "task": task, "answer_token": token, "answer": answer,
            "p_base": clean.prob(token), "p_block": p_block, "skipped": skipped}


def model_answer(model: HookedModel, clean: CleanRun, token: int, gold: str,
                 max_new_tokens: int) -> str:
    """The greedy answer text, decoding no further once it cannot equal ``gold``."""
    tokenizer = model.tokenizer
    target = gold.strip().lower()

    def hopeless(tokens: list[int]) -> bool:
        text = tokenizer.decode(tokens, skip_special_tokens=True).strip().lower()
        return not text.endswith("\ufffd") and not target.startswith(text)

    tokens = greedy_continue(model, clean, token, max_new_tokens=max_new_tokens,
                             eos_token_id=tokenizer.eos_token_id, stop=hopeless)
    return tokenizer.decode(tokens, skip_special_tokens=True)


def results_frame(records: Sequence[Mapping[str, Any]], flows: Sequence[Flow], window: int,
                  n_layers: int) -> pd.DataFrame:
    """The long table of stored records; ``attrs["dropped"]`` lists the dropped examples."""
    windows = [window_layers(layer, window, n_layers) for layer in range(n_layers)]
    rows, dropped = [], []
    for record in records:
        if record.get("dropped"):
            dropped.append({"example_id": record["example_id"], "task": record["task"],
                            "flow": "all", "reason": record["dropped"]})
            continue
        for flow, reason in record.get("skipped", {}).items():
            dropped.append({"example_id": record["example_id"], "task": record["task"],
                            "flow": flow, "reason": reason})
        p_base = record["p_base"]
        for flow in flows:
            for layer, p_block in enumerate(record["p_block"].get(flow.name, [])):
                rows.append({
                    "example_id": record["example_id"], "task": record["task"],
                    "flow": flow.name, "layer": layer, "window_start": windows[layer][0],
                    "window_end": windows[layer][-1] + 1, "answer_token": record["answer_token"],
                    "answer": record["answer"], "p_base": p_base, "p_block": p_block,
                    "rel_change": (p_block - p_base) / p_base * 100.0,
                })
    columns = ["example_id", "task", "flow", "layer", "window_start", "window_end",
               "answer_token", "answer", "p_base", "p_block", "rel_change"]
    frame = pd.DataFrame(rows, columns=columns)
    # Plain records, not a DataFrame: pandas compares attrs with == in concat and merges.
    frame.attrs["dropped"] = dropped
    frame.attrs["window"] = window
    return frame


def dropped_examples(frame: pd.DataFrame) -> pd.DataFrame:
    """What an ``information_flow`` result left out: ``example_id, task, flow, reason``.

    ``flow`` is ``"all"`` for an example left out entirely (e.g. answered wrongly), else the
    one flow it could not take part in (e.g. an empty ``related`` span).
    """
    return pd.DataFrame(frame.attrs.get("dropped", []),
                        columns=["example_id", "task", "flow", "reason"])
