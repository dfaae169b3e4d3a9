"""Information flow into a free-form answer: the answer is teacher-forced after the prompt (the
model's own greedy answer, or a given reference), and attention from the positions predicting
its tokens to a source span is blocked in a window of layers around each centre layer.

    frame = answer_flow(model, batch, answers=["a red square"], window=3)
    answer_summary(frame)        # per example, flow and centre: seq-logprob, normalised change

One row per example, flow, centre layer and answer token: ``example``, ``answer`` (its text),
``flow`` (``image->answer``, ``question->answer``, or ``SPAN->answer`` from any span of the
batch, e.g. ``related`` and ``other``), ``layer``, ``index`` (the token's place in
the answer), ``token``, ``logprob_base`` and ``logprob_block`` (the log-probability of that
answer token given the prompt and the answer's earlier tokens). ``answer_summary`` adds up a
row group: ``seq_logprob_*`` (the answer's log-probability) and ``norm_prob_*`` (its
length-normalised probability, ``exp(mean logprob)``), with ``seq_logprob_change``,
``norm_prob_change`` (the relative change of the normalised probability, percent) and
``fg_tracer_change`` (that change where it is a drop, 0 where the probability rose: the
measure FG-TRACER averages; see docs/free-form.md).

Fast and exact, as the study's engine: a knockout of edges into the predicting positions
(from ``p``, the last prompt position, on) in layers ``a..`` changes nothing before ``p`` nor
below ``a``, so each example runs once (``clean_run``) and each window resumes the flows'
variants together (one row each) from ``resid[a][:, p:]`` on the clean keys and values;
``fast=False`` runs one full forward per variant with ``block_attention`` instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mmlens.core.errors import MMLensError
from mmlens.inputs.batch import MultimodalBatch
from mmlens.methods.clean_run import clean_run, single_example
from mmlens.methods.edges import blocked_edges
from mmlens.methods.knockout import block_attention
from mmlens.methods.windows import default_window, window_layers
from mmlens.model.protocol import HookedModel

SOURCES = {"image->answer": "image", "question->answer": "question"}
COLUMNS = ["example", "answer", "flow", "layer", "index", "token", "logprob_base",
           "logprob_block"]


@torch.no_grad()
def answer_flow(model: HookedModel, batch: MultimodalBatch, *,
                answers: Sequence[str] | None = None, flows: Sequence[str] = tuple(SOURCES),
                window: int | None = None, centres: Sequence[int] | None = None,
                max_new_tokens: int = 8, fast: bool = True,
                answer_ids: Sequence[Tensor] | None = None) -> pd.DataFrame:
    """The per-answer-token frame of the module docstring. ``answers``: one reference per
    example (default: the model's greedy answer, up to ``max_new_tokens``, its end-of-text
    token left out); ``answer_ids``: the answers as token ids instead of text.
    ``window``: layers per window (default the study's); ``centres``: default every layer."""
    names = [source_span(f) for f in flows]
    if model.cfg.text.cross_attention_layers:
        raise MMLensError(
            "answer_flow blocks prompt positions, and this model's image is not in the prompt "
            f"(cross-attention layers {list(model.cfg.text.cross_attention_layers)}): block its "
            "image keys with block_attention('image', 'answer-positions', layers, model=model) "
            "and run_with_hooks, or study one-word answers with information_flow")
    given = answers if answers is not None else answer_ids
    if answers is not None and answer_ids is not None:
        raise MMLensError("give answers (text) or answer_ids (tokens), not both")
    if given is not None and len(given) != len(batch):
        raise MMLensError(f"got {len(given)} answers for {len(batch)} examples: give one "
                          "reference per example, or none to use the model's own answers")
    n_layers = model.cfg.n_layers
    window = default_window(n_layers) if window is None else window
    centres = range(n_layers) if centres is None else centres
    rows = []
    for i in range(len(batch)):
        one = single_example(batch, i)
        ids = (torch.as_tensor(answer_ids[i], dtype=torch.long).cpu() if answer_ids is not None
               else answer_tokens(model, one, None if answers is None else answers[i],
                                  max_new_tokens))
        forced = teacher_forced(one, ids)
        predicting = forced.positions("answer", 0) - 1
        missing = [name for name in names if name not in forced.spans[0]]
        if missing:
            raise MMLensError(f"flow {missing[0]}->answer names a span the example lacks: use "
                              f"one of {', '.join(sorted(forced.spans[0]))}")
        sources = [forced.positions(name, 0) for name in names]
        text = model.tokenizer.decode(ids.tolist()) if model.tokenizer is not None else ""
        clean = clean_run(model, forced) if fast else None
        base = _answer_logprobs(model, forced, ids, [])[0]
        for centre in centres:
            layers = window_layers(int(centre), window, n_layers)
            blocked = (_resumed(model, clean, sources, predicting, layers, ids) if fast else
                       torch.stack([_answer_logprobs(model, forced, ids, block_attention(
                           [src], [predicting], layers, batch=forced))[0] for src in sources]))
            for flow, values in zip(flows, blocked, strict=True):
                rows += [(i, text, flow, int(centre), index, int(ids[index]), float(base[index]),
                          float(values[index])) for index in range(len(ids))]
    return pd.DataFrame(rows, columns=COLUMNS)


def source_span(flow: str) -> str:
    """The source span of an answer flow ``"SPAN->answer"``; refuses any other target."""
    source, arrow, target = flow.partition("->")
    if not arrow or target != "answer" or not source or source == "answer":
        raise MMLensError(f"unknown answer flow {flow!r}: use SPAN->answer, e.g. "
                          f"{', '.join(SOURCES)}, related->answer")
    return source


def teacher_forced(example: MultimodalBatch, answer_ids: Tensor) -> MultimodalBatch:
    """One unpadded example with ``answer_ids`` appended after its prompt, as span
    ``answer``."""
    if len(example) != 1 or not bool(example.attention_mask.all()):
        raise MMLensError("teacher_forced takes one example without padding "
                          "(single_example(batch, i))")
    if answer_ids.ndim != 1 or len(answer_ids) == 0:
        raise MMLensError("the answer has no tokens: give a non-empty reference")
    device = example.input_ids.device
    n = example.input_ids.shape[1]
    ids = torch.cat([example.input_ids, answer_ids.to(device)[None]], dim=1)
    spans = {**example.spans[0], "answer": torch.arange(n, ids.shape[1])}
    return dataclasses.replace(example, input_ids=ids, attention_mask=torch.ones_like(ids),
                               spans=[spans])


def answer_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per example, flow and centre layer: the answer's log-probability and its
    length-normalised probability, clean and blocked, and their changes."""
    groups = frame.groupby(["example", "answer", "flow", "layer"], sort=False)
    summary = groups.agg(n_tokens=("token", "size"), seq_logprob_base=("logprob_base", "sum"),
                         seq_logprob_block=("logprob_block", "sum")).reset_index()
    summary["seq_logprob_change"] = summary.seq_logprob_block - summary.seq_logprob_base
    for kind in ("base", "block"):
        summary[f"norm_prob_{kind}"] = np.exp(summary[f"seq_logprob_{kind}"] / summary.n_tokens)
    summary["norm_prob_change"] = ((summary.norm_prob_block - summary.norm_prob_base)
                                   / summary.norm_prob_base * 100.0)
    summary["fg_tracer_change"] = summary.norm_prob_change.clip(upper=0.0)
    return summary


def answer_tokens(model: HookedModel, one: MultimodalBatch, reference: str | None,
                  max_new_tokens: int) -> Tensor:
    """The ids of ``reference`` (no special tokens), or of the model's greedy answer to the
    one-example batch ``one`` (up to ``max_new_tokens``, stopping before end-of-text)."""
    if reference is not None:
        if model.tokenizer is None:
            raise MMLensError("a text reference needs the model's tokenizer")
        return torch.tensor(model.tokenizer(reference, add_special_tokens=False)["input_ids"])
    tokens = model.generate(one, max_new_tokens=max_new_tokens, return_type="tokens")
    new = tokens[0, one.input_ids.shape[1]:].cpu()
    eos = getattr(model.tokenizer, "eos_token_id", None)
    if eos is not None and (new == eos).any():
        new = new[:int((new == eos).nonzero()[0])]
    if len(new) == 0:
        raise MMLensError("the model's answer is empty (it ended at once): give references")
    return new


def _answer_logprobs(model: HookedModel, forced: MultimodalBatch, ids: Tensor,
                     hooks: list) -> Tensor:
    """``[1, answer]``: log p(answer token) at each predicting position, one full forward."""
    logits = model.run_with_hooks(forced, fwd_hooks=hooks)
    return _gather(logits[:, -len(ids) - 1:-1], ids)


def _resumed(model: HookedModel, clean: Any, sources: list[Tensor], predicting: Tensor,
             layers: list[int], ids: Tensor) -> Tensor:
    """``[flows, answer]``: the same, each flow's edges blocked in ``layers``, resumed from
    the clean run at the first predicting position (one row per flow)."""
    start, n_keys, n = int(predicting[0]), clean.n_positions, len(sources)
    blocked = blocked_edges(sources, [predicting] * n, n_keys - start, n_keys)
    blocked = blocked.to(clean.resid[0].device)[:, None]
    hooks = [(f"blocks.{layer}.attn.hook_mask", lambda mask, hook: mask & ~blocked)
             for layer in layers]
    suffix = clean.resid[layers[0]][:, start:].expand(n, -1, -1)
    # Qwen3-VL's DeepStack features: each row gets the suffix's slice of the clean run's.
    injections = ({layer: features[:, start:].expand(n, -1, -1)
                   for layer, features in clean.injections.items()} if clean.injections else None)
    with model.hooks(fwd_hooks=hooks):
        final = model(suffix, start_at_layer=layers[0], stop_at_layer=model.cfg.n_layers,
                      past_kv_cache=clean.cache.truncate(start).expand(n), injections=injections,
                      position_ids=clean.position_ids[..., start:n_keys],
                      attention_mask=torch.ones(n, suffix.shape[1], dtype=torch.long,
                                                device=suffix.device))
    logits = model.unembed(model.ln_final(final))
    return _gather(logits[:, :len(ids)], ids)


def _gather(logits: Tensor, ids: Tensor) -> Tensor:
    logprobs = logits.float().log_softmax(-1)
    index = ids.to(logprobs.device)[None, :, None].expand(logprobs.shape[0], -1, 1)
    return logprobs.gather(-1, index)[..., 0].cpu()
