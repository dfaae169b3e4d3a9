"""Answer emergence: when does the answer appear at the last position, and in which case?

    df = answer_emergence(model, examples)
    df.groupby(["variant", "reading", "layer"]).prob.mean()

The residual stream at the last position is read through the unembedding (``mmlens.methods.lens``)
in three ways (the ``reading`` column):

- ``paper``: Hugging Face's ``hidden_states[0..L]`` times the unembedding with no norm in
  between, as the paper's code reads them, on the paper's axis: layer ``l`` is
  ``hidden_states[l]``, so layer 0 is the merged embeddings and layer ``L`` the model's output
  (which Hugging Face returns after the final norm).
- ``no_norm``: the residual after each layer ``0..L-1``, no norm (the paper's layer ``l + 1``).
- ``final_norm``: the residual after each layer through the final norm (the usual logit lens).
- ``tuned``: with a trained ``TunedLens`` (``tuned_lens=``), the residual after each layer
  through its translator, then the final norm (``mmlens.methods.tuned_lens``).

The residuals come from the study's one clean run per example (``CleanRun``): the sweep stores
``lens_record`` with each example and ``emergence_frame`` turns the records into the table.
Tracked tokens (``variant``): the gold answer's first token in lowercase (``lower``) and
capitalised (``capitalised``) form, and for choose-questions the other option (``wrong``,
``wrong_capitalised``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from mmlens.experiments.correctness import (
    FILTER_MAX_NEW_TOKENS,
    model_answer,
    wrong_answer_reason,
)
from mmlens.experiments.engine import CleanRun, clean_run
from mmlens.experiments.examples import ExampleSource
from mmlens.experiments.presets import resolve_settings
from mmlens.inputs.batch import MultimodalBatch
from mmlens.methods.lens import decode, first_token_ids
from mmlens.methods.tuned_lens import TunedLens
from mmlens.model.protocol import HookedModel

COLUMNS = ["example_id", "task", "layer", "variant", "token", "reading", "prob", "rank"]
READINGS: tuple[str, ...] = ("paper", "no_norm", "final_norm")


def answer_variants(model: HookedModel, answer: str, wrong: str | None) -> dict[str, int]:
    """First tokens of the answer (and wrong option) in lowercase and capitalised form."""
    variants = {"lower": answer.strip().lower(), "capitalised": answer.strip().capitalize()}
    if wrong:
        variants["wrong"] = wrong.strip().lower()
        variants["wrong_capitalised"] = wrong.strip().capitalize()
    return {name: first_token_ids(model, text) for name, text in variants.items()}


@torch.no_grad()
def lens_record(model: HookedModel, clean: CleanRun, variants: Mapping[str, int],
                tuned: TunedLens | None = None) -> dict[str, Any]:
    """Each reading's probability and rank of each variant token, per layer, from one clean run.

    Returns ``{"variants": {name: token}, "readings": {reading: {"first_layer": int, "prob":
    [[p per variant] per layer], "rank": [...]}}}`` (plain lists, stored as JSON).
    """
    n_layers = model.cfg.n_layers
    resid = torch.stack([r[0, -1] for r in clean.resid])  # [layers + 1, d_model]
    paper = torch.cat([decode(model, resid[:n_layers], apply_ln=False).float(),
                       clean.logits[None].to(resid.device)])
    readings = {"paper": (0, paper),
                "no_norm": (0, decode(model, resid[1:], apply_ln=False).float()),
                "final_norm": (0, decode(model, resid[1:], apply_ln=True).float())}
    if tuned is not None:
        translated = torch.stack([tuned.translate(resid[layer + 1], layer)
                                  for layer in range(n_layers)])
        readings["tuned"] = (0, decode(model, translated, apply_ln=True).float())
    tokens = list(variants.values())
    out = {}
    for name, (first_layer, logits) in readings.items():
        chosen = logits[:, tokens]  # [layers, variants]
        ranks = (logits[:, None, :] > chosen[:, :, None]).sum(-1) + 1
        out[name] = {"first_layer": first_layer,
                     "prob": logits.softmax(-1)[:, tokens].tolist(), "rank": ranks.tolist()}
    return {"variants": dict(variants), "readings": out}


def emergence_frame(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The long emergence table of records holding a ``lens`` entry (``lens_record``)."""
    rows = []
    for record in records:
        lens = record.get("lens")
        if not lens:
            continue
        names = list(lens["variants"])
        for reading, values in lens["readings"].items():
            for offset, (probs, ranks) in enumerate(zip(values["prob"], values["rank"],
                                                        strict=True)):
                layer = values["first_layer"] + offset
                for name, prob, rank in zip(names, probs, ranks, strict=True):
                    rows.append([record["example_id"], record["task"], layer, name,
                                 lens["variants"][name], reading, prob, rank])
    return pd.DataFrame(rows, columns=COLUMNS)


@torch.no_grad()
def answer_emergence(
    model: HookedModel,
    examples: Sequence[Any] | MultimodalBatch,
    *,
    only_correct: bool = True,
    progress: bool = True,
    preset: Any = None,
    template: Any = None,
    preprocessing: str | None = None,
    tokenization: str | None = None,
    max_new_tokens: int = FILTER_MAX_NEW_TOKENS,
    tuned_lens: TunedLens | None = None,
) -> pd.DataFrame:
    """The answer's probability and rank at the last position, per layer and reading.

    One row per example x variant x reading x layer; ``rank`` 1 is the top token.
    ``examples`` are ``Example`` records (or a batch built from them); with ``only_correct``
    the examples the model gets wrong are left out and listed in ``df.attrs["dropped"]``.
    ``preset`` and the prompt settings are resolved as in ``information_flow``, which with
    ``lens=True`` gives the same rows from the sweep's own clean runs.
    """
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("answer emergence tracks answer words, but this model has no "
                         "tokenizer: load it with from_pretrained")
    settings = resolve_settings(model, preset, template=template, preprocessing=preprocessing,
                                tokenization=tokenization)
    source = ExampleSource(model, examples, **settings.prepare_options())
    source.check_gold_answers()
    records, dropped = [], []
    for index in tqdm(range(len(source)), disable=not progress, desc="answer emergence",
                      unit="ex"):
        example_id, task, gold = source.example_id(index), source.task(index), source.gold(index)
        clean = clean_run(model, source.prepare(index))
        if only_correct:
            token = clean.prediction(exclude=model.cfg.image_token_id)
            reason = wrong_answer_reason(
                model_answer(model, clean, token, gold, max_new_tokens), gold)
            if reason is not None:
                dropped.append({"example_id": example_id, "task": task, "reason": reason})
                continue
        wrong = getattr(source.records[index], "wrong_answer", None)
        records.append({"example_id": example_id, "task": task,
                        "lens": lens_record(model, clean, answer_variants(model, gold, wrong),
                                            tuned_lens)})
    frame = emergence_frame(records)
    frame.attrs["dropped"] = dropped
    return frame
