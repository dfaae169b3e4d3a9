"""Logit lens: decode the residual stream after any layer, at any position, into tokens.

``apply_ln=True`` runs the residual through the final RMSNorm and the unembedding (the usual
logit lens); ``apply_ln=False`` multiplies it by the unembedding directly, as the paper's code
does for intermediate layers. Layer ``l`` is ``blocks.{l}.hook_resid_post``; layer ``-1`` (or
``"embed"``) is ``hook_embed``, the residual stream's input.

    _, cache = model.run_with_cache(batch, names_filter=lens_names(model))
    token_probabilities(model, cache, answer_tokens(model, "yes", wrong="no"), batch=batch)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mmlens.inputs.batch import MultimodalBatch
from mmlens.methods.knockout import PositionSpec, resolve_positions
from mmlens.model.protocol import HookedModel

Layer = int | str
TokenSpec = int | str | Sequence[int | str]
"""A token id, a string (its first token), or one of these per example."""


def resid_name(layer: Layer) -> str:
    """The cached residual after ``layer``: ``hook_embed`` for -1 / ``"embed"``."""
    if layer in (-1, "embed"):
        return "hook_embed"
    if not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer {layer!r} is not a layer: use 0..n_layers-1, or -1 / 'embed' "
                         "for the embedding")
    return f"blocks.{layer}.hook_resid_post"


def lens_names(model: HookedModel) -> list[str]:
    """The hook names the lens reads, for ``run_with_cache(..., names_filter=...)``."""
    return [resid_name(layer) for layer in range(-1, model.cfg.n_layers)]


def residual_stack(
    cache: Any,
    *,
    layers: Sequence[Layer] | None = None,
    positions: PositionSpec = "last",
    batch: MultimodalBatch | None = None,
    n_layers: int | None = None,
) -> tuple[Float[Tensor, "layer item d_model"], pd.DataFrame]:
    """Residuals at the chosen ``(example, position)`` items for each layer.

    Returns the stack and an index frame with one row per item (columns ``example``,
    ``position``). ``positions`` is a span name (needs ``batch``; ``"last"`` works without),
    positions shared by every example, or one list per example.
    """
    layers = list(range(n_layers)) if layers is None else list(layers)
    names = [resid_name(layer) for layer in layers]
    missing = [name for name in names if name not in cache]
    if missing:
        raise KeyError(f"the cache has no {missing[0]}: run "
                       "model.run_with_cache(batch, names_filter=lens_names(model))")
    first = cache[names[0]]
    n_examples, seq_len = first.shape[:2]
    if isinstance(positions, str) and positions == "last" and batch is None:
        positions = [seq_len - 1]  # batches are left padded: the last column is every prompt's end
    resolved = resolve_positions(positions, batch, role="positions")
    per_example = resolved if isinstance(resolved, list) else [resolved] * n_examples
    if len(per_example) != n_examples:
        raise ValueError(f"positions are given for {len(per_example)} examples but the cache "
                         f"holds {n_examples}: give one list per example")
    examples = torch.cat([torch.full_like(p, i) for i, p in enumerate(per_example)])
    flat = torch.cat(per_example)
    if int(flat.max()) >= seq_len:
        raise IndexError(f"position {int(flat.max())} is outside the cached {seq_len} positions")
    stack = torch.stack([cache[name][examples, flat] for name in names])
    index = pd.DataFrame({"example": examples.tolist(), "position": flat.tolist()})
    return stack, index


def decode(
    model: HookedModel, resid: Float[Tensor, "... d_model"], *, apply_ln: bool = True
) -> Float[Tensor, "... d_vocab"]:
    """Logits: ``unembed(ln_final(resid))``, or ``unembed(resid)`` without the final norm,
    through the family's last step (Gemma 2's soft-cap), as the model's own logits."""
    return model.family.final_logits(
        model.unembed(model.ln_final(resid) if apply_ln else resid), model.cfg)


def answer_tokens(model: HookedModel, answer: str | Sequence[str],
                  wrong: str | Sequence[str] | None = None) -> dict[str, Any]:
    """The answer's first token in lowercase and capitalised form, and the wrong option's.

    ``answer`` / ``wrong`` may be one string or one per example. Returns a mapping for
    ``token_probabilities``: ``{"answer": ..., "Answer": ..., "wrong": ...}``.
    """
    def each(texts: str | Sequence[str], change: Any) -> str | list[str]:
        return change(texts) if isinstance(texts, str) else [change(t) for t in texts]

    tokens = {"answer": each(answer, str.lower), "Answer": each(answer, str.capitalize)}
    if wrong is not None:
        tokens["wrong"] = each(wrong, str.lower)
    return {label: first_token_ids(model, texts) for label, texts in tokens.items()}


def first_token_ids(model: HookedModel, tokens: TokenSpec) -> int | list[int]:
    """Token ids; a string gives its first token (without special tokens)."""
    if isinstance(tokens, int | str):
        return _first_token(model, tokens)
    return [_first_token(model, token) for token in tokens]


def _first_token(model: HookedModel, token: int | str) -> int:
    if isinstance(token, int):
        if not 0 <= token < model.cfg.d_vocab:
            raise ValueError(f"token id {token} is outside the vocabulary "
                             f"0..{model.cfg.d_vocab - 1}")
        return token
    if model.tokenizer is None:
        raise ValueError(f"token {token!r} is a string but the model has no tokenizer: give "
                         "token ids, or load the model with its processor")
    ids = model.tokenizer(token, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{token!r} tokenizes to nothing: give a non-empty string")
    return ids[0]


def token_probabilities(
    model: HookedModel,
    cache: Any,
    tokens: Mapping[str, TokenSpec] | Sequence[int | str],
    *,
    positions: PositionSpec = "last",
    batch: MultimodalBatch | None = None,
    layers: Sequence[Layer] | None = None,
    apply_ln: bool = True,
    tuned: Any = None,
) -> pd.DataFrame:
    """Probability and rank (1 = top) of chosen tokens after each layer, as a tidy frame.

    ``tokens``: ``{label: token}`` (a token id, a string, or one per example; see
    ``answer_tokens``) or a list of tokens shared by every example (labelled by themselves).
    Columns: ``example, layer, position, label, token_id, token, logit, prob, rank``.
    ``tuned``: a ``TunedLens`` (``mmlens.methods.tuned_lens``) read instead of the logit lens.
    """
    if not isinstance(tokens, Mapping):
        tokens = {str(token): token for token in tokens}
    stack, index = residual_stack(cache, layers=layers, positions=positions, batch=batch,
                                  n_layers=model.cfg.n_layers)
    layer_labels = _layer_labels(layers, model.cfg.n_layers)
    ids = {label: _per_item(first_token_ids(model, spec), index, label)
           for label, spec in tokens.items()}
    frames = []
    for layer, resid in zip(layer_labels, stack, strict=True):
        logits = decode(model, _translated(tuned, resid, layer), apply_ln=apply_ln).float()
        log_probs = logits.log_softmax(-1)
        for label, token_ids in ids.items():
            token_ids = token_ids.to(logits.device)
            chosen = logits.gather(-1, token_ids[:, None])
            frames.append(index.assign(
                layer=layer, label=label, token_id=token_ids.tolist(),
                logit=chosen[:, 0].tolist(),
                prob=log_probs.gather(-1, token_ids[:, None])[:, 0].exp().tolist(),
                rank=((logits > chosen).sum(-1) + 1).tolist()))
    frame = pd.concat(frames, ignore_index=True)
    frame["token"] = _token_strings(model, frame["token_id"])
    return frame[["example", "layer", "position", "label", "token_id", "token", "logit", "prob",
                  "rank"]]


def top_tokens(
    model: HookedModel,
    cache: Any,
    *,
    k: int = 5,
    positions: PositionSpec = "last",
    batch: MultimodalBatch | None = None,
    layers: Sequence[Layer] | None = None,
    apply_ln: bool = True,
    tuned: Any = None,
) -> pd.DataFrame:
    """The ``k`` most likely tokens after each layer: columns ``example, layer, position,
    rank, token_id, token, logit, prob``; ``tuned`` as in ``token_probabilities``."""
    stack, index = residual_stack(cache, layers=layers, positions=positions, batch=batch,
                                  n_layers=model.cfg.n_layers)
    frames = []
    for layer, resid in zip(_layer_labels(layers, model.cfg.n_layers), stack, strict=True):
        logits = decode(model, _translated(tuned, resid, layer), apply_ln=apply_ln).float()
        probs = logits.softmax(-1)
        top = logits.topk(k, dim=-1)
        for rank in range(k):
            token_ids = top.indices[:, rank]
            frames.append(index.assign(
                layer=layer, rank=rank + 1, token_id=token_ids.tolist(),
                logit=top.values[:, rank].tolist(),
                prob=probs.gather(-1, token_ids[:, None])[:, 0].tolist()))
    frame = pd.concat(frames, ignore_index=True)
    frame["token"] = _token_strings(model, frame["token_id"])
    return frame[["example", "layer", "position", "rank", "token_id", "token", "logit", "prob"]]


def _translated(tuned: Any, resid: Tensor, layer: int) -> Tensor:
    """The residual through a tuned lens's translator for ``layer``, or unchanged."""
    return resid if tuned is None else tuned.translate(resid, layer)


def _layer_labels(layers: Sequence[Layer] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    return [-1 if layer == "embed" else int(layer) for layer in layers]


def _per_item(token_ids: int | list[int], index: pd.DataFrame, label: str) -> Tensor:
    """One token id per ``(example, position)`` item."""
    if isinstance(token_ids, int):
        return torch.full((len(index),), token_ids, dtype=torch.long)
    n_examples = int(index["example"].max()) + 1
    if len(token_ids) != n_examples:
        raise ValueError(f"tokens[{label!r}] gives {len(token_ids)} tokens but there are "
                         f"{n_examples} examples: give one token, or one per example")
    return torch.tensor(token_ids)[torch.tensor(index["example"].to_numpy())]


def _token_strings(model: HookedModel, token_ids: pd.Series) -> list[str]:
    if model.tokenizer is None:
        return [str(t) for t in token_ids]
    return model.tokenizer.convert_ids_to_tokens([int(t) for t in token_ids])
