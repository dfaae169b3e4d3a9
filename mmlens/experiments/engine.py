"""The fast, exact knockout engine: one clean pass, then only what a knockout can change.

A knockout in layers ``[a, b)`` whose targets start at position ``p`` leaves every position
before ``p`` (causal attention) and every layer before ``a`` exactly as in the clean run. So
the clean pass keeps the residual stream entering every layer and every layer's keys/values;
each knockout then recomputes positions ``p..`` from layer ``a`` on, attending to the cached
clean keys/values of positions ``< p``:

    clean run ─▶ resid[a][:, p:] ─▶ blocks a..L-1 (keys/values < p from the cache,
                                     edges target→source masked in [a, b)) ─▶ logits[-1]

Knockouts with the same ``p`` share a batch (``* -> last``: one-token suffixes; ``* ->
question``: the prompt from the question on). Rows of a batch are sorted by their first
layer and each joins the batch there with the clean residual, so no row runs a layer its
knockout cannot change.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from mmlens.experiments.knockouts import Knockout
from mmlens.experiments.memory import auto_batch_size
from mmlens.inputs.batch import MultimodalBatch
from mmlens.methods.edges import blocked_edges, check_attendable
from mmlens.model.kv_cache import KeyValueCache
from mmlens.model.protocol import HookedModel


@dataclass
class CleanRun:
    """The unmodified run of one (unpadded) example.

    ``resid[l]`` is the residual stream entering layer ``l`` ``[1, pos, d_model]``; ``resid[L]``
    is the stream after the last layer. ``cache`` holds every layer's keys/values of the prompt
    (and of any tokens decoded after it). ``logits`` ``[d_vocab]`` (float32) is the prediction
    at the last prompt position. ``position_ids`` are the decoder positions the model's family
    gave the prompt (``[1, pos]``, or the family's own layout such as M-RoPE's); a knockout's
    suffix is recomputed at exactly these positions. ``token_type_ids`` are the token kinds
    the family's mask rule reads (Gemma 3's image tokens), None where it needs none.
    """

    resid: list[Tensor]
    cache: KeyValueCache
    logits: Float[Tensor, " d_vocab"]
    n_positions: int
    position_ids: Tensor
    token_type_ids: Tensor | None = None

    def prediction(self, exclude: int | None = None) -> int:
        """The argmax token at the last position, never ``exclude`` (the image token)."""
        logits = self.logits.clone()
        if exclude is not None:
            logits[exclude] = float("-inf")
        return int(logits.argmax())

    def prob(self, token: int) -> float:
        return float(self.logits.softmax(-1)[token])


def single_example(batch: MultimodalBatch, index: int = 0) -> MultimodalBatch:
    """Example ``index`` of ``batch`` on its own, without padding; refuses inner padding."""
    one = batch.select(index)
    if not bool(one.attention_mask.all()):
        raise ValueError(f"example {index} has padding inside its prompt: the knockout engine "
                         "needs left padding only, as model.prepare produces")
    return one


@torch.no_grad()
def clean_run(model: HookedModel, example: MultimodalBatch) -> CleanRun:
    """Run one unpadded example once, keeping per-layer residuals and keys/values."""
    n_layers = model.cfg.n_layers
    resid: list[Tensor | None] = [None] * (n_layers + 1)

    def keep(layer: int):
        def hook(tensor: Tensor, hook) -> None:
            resid[layer] = tensor.detach()

        return hook

    hooks = [(f"blocks.{layer}.hook_resid_pre", keep(layer)) for layer in range(n_layers)]
    hooks.append((f"blocks.{n_layers - 1}.hook_resid_post", keep(n_layers)))
    cache = KeyValueCache.empty(n_layers)
    with model.hooks(fwd_hooks=hooks):
        final = model(example.input_ids, example.pixel_values, image_sizes=example.image_sizes,
                      past_kv_cache=cache, stop_at_layer=n_layers)
    return CleanRun(resid=resid, cache=cache, logits=last_logits(model, final)[0],
                    n_positions=example.input_ids.shape[1], position_ids=cache.position_ids,
                    token_type_ids=model.family.token_type_ids(model.cfg, example.input_ids))


def last_logits(model: HookedModel, final_resid: Float[Tensor, "batch pos d_model"]
                ) -> Float[Tensor, "batch d_vocab"]:
    """Float32 logits at the last position only (the sweep never reads the others)."""
    logits = model.unembed(model.ln_final(final_resid[:, -1:]))
    return model.family.final_logits(logits, model.cfg)[:, -1].float()


@torch.no_grad()
def greedy_continue(model: HookedModel, clean: CleanRun, first_token: int, *, max_new_tokens: int,
                    eos_token_id: int | None, stop=None) -> list[int]:
    """Greedy decoding from the clean run's cache: ``first_token`` then more argmax tokens.

    Stops at ``eos_token_id``, after ``max_new_tokens`` tokens, or when ``stop(tokens)`` says
    so (e.g. once the text can no longer match the gold answer). Extends ``clean.cache``.
    """
    tokens = [first_token]
    device = clean.logits.device
    while len(tokens) < max_new_tokens and tokens[-1] != eos_token_id:
        if stop is not None and stop(tokens):
            break
        step = torch.tensor([[tokens[-1]]], device=clean.resid[0].device)
        logits = model(step, past_kv_cache=clean.cache)[0, -1].float().to(device)
        logits[model.cfg.image_token_id] = float("-inf")
        tokens.append(int(logits.argmax()))
    return tokens


def _start(knockout: Knockout, n_positions: int, n_layers: int) -> tuple[int, int]:
    """(first position, first layer) the knockout can change; no layers: only the final norm."""
    position = int(knockout.target.min()) if len(knockout.target) else n_positions - 1
    layer = min(knockout.layers) if knockout.layers else n_layers
    return position, layer


def _edge_masks(knockouts: Sequence[Knockout], position: int, n_keys: int) -> Tensor:
    """Per row, the edges to block ``[rows, q_len, k_len]`` (True = blocked).

    Raises when a row would leave a query with no key to attend to (its softmax would be
    undefined), as ``block_attention`` does.
    """
    blocked = blocked_edges([k.source for k in knockouts], [k.target for k in knockouts],
                            n_keys - position, n_keys)
    causal = torch.arange(n_keys)[None, :] <= torch.arange(position, n_keys)[:, None]
    check_attendable((causal & ~blocked)[:, None], position, "knockout sweep", "knockout")
    return blocked


def _mask_hook(blocked: Tensor, active: Tensor):
    """A ``hook_mask`` edit: the active rows' blocked edges set to "may not attend".

    The batch at a layer is a prefix of the rows (rows join as their window starts).
    """

    def hook(mask: Tensor, hook) -> Tensor:
        n = mask.shape[0]
        edges = (blocked[:n] & active[:n, None, None])[:, None]
        return mask & ~edges.to(mask.device)  # a no-op unless the model spans devices

    return hook


@torch.no_grad()
def _run_rows(model: HookedModel, clean: CleanRun, knockouts: Sequence[Knockout], position: int,
              tokens: list[int]) -> Float[Tensor, "rows n_tokens"]:
    """Rows sorted by first layer; each joins the batch at its first layer with the clean
    residual there, so every row runs exactly the layers its knockout can change."""
    n_layers = model.cfg.n_layers
    starts = [_start(k, clean.n_positions, n_layers)[1] for k in knockouts]
    device = clean.resid[0].device
    # Built on the host and moved once: no device sync inside the layer loop.
    blocked = _edge_masks(knockouts, position, clean.n_positions).to(device)
    active = torch.tensor([[layer in k.layers for k in knockouts] for layer in range(n_layers)])
    hooks = [(f"blocks.{layer}.attn.hook_mask", _mask_hook(blocked, active[layer].to(device)))
             for layer in range(starts[0], n_layers) if bool(active[layer].any())]
    prefix = clean.cache.truncate(position)
    # One row of positions broadcasts over the batch in the rotary tables.
    positions = clean.position_ids[..., position:clean.n_positions]
    resid = clean.resid[0].new_empty(0, clean.n_positions - position, model.cfg.d_model)
    kinds = None if clean.token_type_ids is None else clean.token_type_ids[:, position:]
    with model.hooks(fwd_hooks=hooks):
        for layer in range(starts[0], n_layers + 1):
            joining = bisect_right(starts, layer) - resid.shape[0]
            if joining:
                clean_suffix = clean.resid[layer][:, position:clean.n_positions]
                resid = torch.cat([resid.to(clean_suffix.device),
                                   clean_suffix.expand(joining, -1, -1)])
            if layer == n_layers:
                break
            n = resid.shape[0]
            resid = model(resid, start_at_layer=layer, stop_at_layer=layer + 1,
                          past_kv_cache=prefix.expand(n), position_ids=positions,
                          attention_mask=torch.ones(n, resid.shape[1], dtype=torch.long,
                                                    device=device),
                          token_type_ids=None if kinds is None else kinds.expand(n, -1))
    return last_logits(model, resid).softmax(-1)[:, tokens]


def fast_knockout_probs(model: HookedModel, clean: CleanRun, knockouts: Sequence[Knockout],
                        token: int | Sequence[int], *, batch_size: int | str = 64,
                        max_memory: int | None = None) -> Float[Tensor, " knockouts *tokens"]:
    """``p(token)`` at the last position under each knockout, from one clean run.

    Exact: the same numbers as a full forward per knockout (``naive_knockout_probs``) up to
    floating-point rounding. ``batch_size`` bounds the rows run together; ``"auto"`` picks
    the most that fit ``max_memory`` bytes or the device's free memory
    (``mmlens.experiments.memory``). A list of tokens gives ``[knockouts, tokens]``.
    """
    tokens = [token] if isinstance(token, int) else list(token)
    n_layers = model.cfg.n_layers
    groups: dict[int, list[int]] = defaultdict(list)
    for index, knockout in enumerate(knockouts):
        position = _start(knockout, clean.n_positions, n_layers)[0]
        # a bidirectional block (Gemma 3's image) is recomputed whole
        groups[model.family.exact_suffix_start(clean.token_type_ids, position)].append(index)
    probs = torch.empty(len(knockouts), len(tokens))
    for position, indices in groups.items():
        indices.sort(key=lambda i: _start(knockouts[i], clean.n_positions, n_layers)[1])
        size = batch_size if batch_size != "auto" else auto_batch_size(
            model, clean.n_positions - position, clean.n_positions, n_rows=len(indices),
            max_memory=max_memory)
        for chunk_start in range(0, len(indices), size):
            chunk = indices[chunk_start:chunk_start + size]
            rows = [knockouts[i] for i in chunk]
            probs[chunk] = _run_rows(model, clean, rows, position, tokens).cpu()
    return probs[:, 0] if isinstance(token, int) else probs

