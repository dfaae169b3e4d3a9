"""Answer emergence: when does the answer appear at the last position, and in which case?

    df = answer_emergence(model, examples)
    df.groupby(["variant", "ln", "layer"]).prob.mean()

The residual stream at the last position after every layer is read through the unembedding
(``mmlens.methods.lens``), with and without the final norm; the residuals come from the same clean
run the knockout engine uses. Tracked tokens: the gold answer's first
token in lowercase (``lower``) and capitalised (``capitalised``) form, and for choose-questions
the wrong option (``wrong``, ``wrong_capitalised``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from mmlens.experiments.engine import clean_run
from mmlens.experiments.examples import ExampleSource
from mmlens.experiments.sweep import model_answer
from mmlens.inputs.batch import MultimodalBatch
from mmlens.methods.lens import decode, first_token_ids
from mmlens.model.protocol import HookedModel

COLUMNS = ["example_id", "task", "layer", "variant", "token", "ln", "prob", "rank"]


def answer_variants(model: HookedModel, answer: str, wrong: str | None) -> dict[str, int]:
    """First tokens of the answer (and wrong option) in lowercase and capitalised form."""
    variants = {"lower": answer.strip().lower(), "capitalised": answer.strip().capitalize()}
    if wrong:
        variants["wrong"] = wrong.strip().lower()
        variants["wrong_capitalised"] = wrong.strip().capitalize()
    return {name: first_token_ids(model, text) for name, text in variants.items()}


@torch.no_grad()
def answer_emergence(
    model: HookedModel,
    examples: Sequence[Any] | MultimodalBatch,
    *,
    only_correct: bool = True,
    progress: bool = True,
    template: Any = None,
    preprocessing: str | None = None,
    max_new_tokens: int = 8,
) -> pd.DataFrame:
    """The answer's probability and rank at the last position after every layer.

    One row per example x layer x variant x ``ln`` (final norm applied or not); ``rank`` 1 is
    the top token. ``examples`` are ``Example`` records (or a batch built from them); with
    ``only_correct`` the examples the model gets wrong are left out and listed in
    ``df.attrs["dropped"]``. ``template`` / ``preprocessing`` as in ``information_flow``.
    """
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("answer emergence tracks answer words, but this model has no "
                         "tokenizer: load it with from_pretrained")
    source = ExampleSource(model, examples, template=template, preprocessing=preprocessing)
    source.check_gold_answers()
    rows, dropped = [], []
    for index in tqdm(range(len(source)), disable=not progress, desc="answer emergence",
                      unit="ex"):
        example_id, task, gold = source.example_id(index), source.task(index), source.gold(index)
        clean = clean_run(model, source.prepare(index))
        if only_correct:
            token = clean.prediction(exclude=model.cfg.image_token_id)
            said = model_answer(model, clean, token, gold, max_new_tokens)
            if said.strip().lower() != gold.strip().lower():
                dropped.append({"example_id": example_id, "task": task,
                                "reason": f"wrong answer {said.strip()!r} (gold {gold!r})"})
                continue
        wrong = getattr(source.records[index], "wrong_answer", None)
        variants = answer_variants(model, gold, wrong)
        resid_after = torch.stack([r[0, -1] for r in clean.resid[1:]])  # [layers, d_model]
        for ln in (False, True):
            logits = decode(model, resid_after, apply_ln=ln).float()
            probs = logits.softmax(-1)
            for variant, token in variants.items():
                ranks = ((logits > logits[:, token:token + 1]).sum(-1) + 1).tolist()
                for layer, prob in enumerate(probs[:, token].tolist()):
                    rows.append([example_id, task, layer, variant, token, ln, prob, ranks[layer]])
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame.attrs["dropped"] = dropped
    return frame
