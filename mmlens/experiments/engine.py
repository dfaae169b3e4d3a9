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
knockout cannot change (a DeepStack removal joins after its first block, with the clean
residual less the features it drops). A knockout that blocks nothing takes the clean run's
numbers, and knockouts alike run once.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace

import torch
from jaxtyping import Float
from torch import Tensor

from mmlens.experiments.knockouts import Knockout
from mmlens.experiments.memory import auto_batch_size
from mmlens.methods.clean_run import CleanRun as CleanRun
from mmlens.methods.clean_run import clean_run as clean_run
from mmlens.methods.clean_run import last_logits as last_logits
from mmlens.methods.clean_run import single_example as single_example
from mmlens.methods.edges import blocked_edges, check_attendable
from mmlens.model.protocol import HookedModel


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
        if model.cfg.image_token_id < logits.shape[-1]:  # past the logits on Mllama
            logits[model.cfg.image_token_id] = float("-inf")
        tokens.append(int(logits.argmax()))
    return tokens


def _start(knockout: Knockout, n_positions: int, n_layers: int) -> tuple[int, int]:
    """(first position, first layer) the knockout can change; no layers: only the final norm.

    A DeepStack removal starts after its first block: that block computes what the clean run
    did, only the features added to its output differ (``_entry``)."""
    position = int(knockout.target.min()) if len(knockout.target) else n_positions - 1
    if not knockout.layers:
        return position, n_layers
    return position, min(knockout.layers) + int(knockout.removes_injection)


def _edge_masks(knockouts: Sequence[Knockout], position: int, n_keys: int) -> Tensor:
    """Per row, the edges to block ``[rows, q_len, k_len]`` (True = blocked).

    Raises when a row would leave a query with no key to attend to (its softmax would be
    undefined), as ``block_attention`` does.
    """
    nothing = torch.zeros(0, dtype=torch.long)  # a DeepStack removal blocks no edge
    blocked = blocked_edges([nothing if k.removes_injection or k.image_keys else k.source
                             for k in knockouts],
                            [k.target for k in knockouts], n_keys - position, n_keys)
    causal = torch.arange(n_keys)[None, :] <= torch.arange(position, n_keys)[:, None]
    check_attendable((causal & ~blocked)[:, None], position, "knockout sweep", "knockout")
    return blocked


def _key_masks(knockouts: Sequence[Knockout], position: int, n_positions: int,
               n_keys: int) -> Tensor:
    """Per row, the image keys to block in the cross-attention layers ``[rows, q_len, keys]``
    (``Knockout.image_keys``: from every key, or the keys ``source`` holds); a query whose
    every key is blocked gets zero output there, the layer's rule."""
    blocked = torch.zeros(len(knockouts), n_positions - position, n_keys, dtype=torch.bool)
    for row, knockout in enumerate(knockouts):
        if knockout.image_keys:
            dst = knockout.target - position
            if knockout.key_source:
                blocked[row, dst[:, None], knockout.source[None, :]] = True
            else:
                blocked[row, dst] = True
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


def _removed_injections(knockouts: Sequence[Knockout], position: int, n_positions: int,
                        layers: Sequence[int]) -> dict[int, Tensor]:
    """Per injected layer, where each row removes the DeepStack features ``[rows, suffix]``."""
    removed = {}
    for layer in layers:
        rows = torch.zeros(len(knockouts), n_positions - position, dtype=torch.bool)
        for row, knockout in enumerate(knockouts):
            if knockout.removes_injection and layer in knockout.layers:
                rows[row, knockout.target - position] = True
        if bool(rows.any()):
            removed[layer] = rows
    return removed


def _injections(clean: CleanRun, removed: dict[int, Tensor], layer: int, position: int,
                n: int) -> dict[int, Tensor]:
    """The clean run's injection after ``layer`` for the first ``n`` rows' suffix, with the
    rows' removals applied; ``{}`` where the layer has none."""
    injected = clean.injections.get(layer)
    if injected is None:
        return {}
    added = injected[:, position:].expand(n, -1, -1)
    if layer in removed:
        added = added.masked_fill(removed[layer][:n, :, None].to(added.device), 0)
    return {layer: added}


def _entry(clean: CleanRun, knockouts: Sequence[Knockout], layer: int, position: int
           ) -> Float[Tensor, "rows suffix d_model"]:
    """The residual suffix entering ``layer`` for rows joining there: the clean run's, less
    the DeepStack features a removal drops from the output of block ``layer - 1``."""
    resid = clean.resid[layer][:, position:clean.n_positions].expand(len(knockouts), -1, -1)
    if layer - 1 not in clean.injections:
        return resid
    removed = _removed_injections(knockouts, position, clean.n_positions, [layer - 1])
    if not removed:
        return resid
    dropped = clean.injections[layer - 1][:, position:].to(resid.device)
    return resid - dropped.masked_fill(~removed[layer - 1][..., None].to(resid.device), 0)


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
    cross = model.cfg.text.cross_attention_layers  # these attend to the image keys instead
    if cross:
        keys = _key_masks(knockouts, position, clean.n_positions,
                          clean.cache.cross.states.shape[1]).to(device)
    hooks = [(f"blocks.{layer}.cross_attn.hook_mask" if layer in cross else
              f"blocks.{layer}.attn.hook_mask",
              _mask_hook(keys if layer in cross else blocked, active[layer].to(device)))
             for layer in range(starts[0], n_layers) if bool(active[layer].any())]
    removed = _removed_injections(knockouts, position, clean.n_positions, list(clean.injections))
    prefix = clean.cache.truncate(position)
    # One row of positions broadcasts over the batch in the rotary tables.
    positions = clean.position_ids[..., position:clean.n_positions]
    resid = clean.resid[0].new_empty(0, clean.n_positions - position, model.cfg.d_model)
    kinds = None if clean.token_type_ids is None else clean.token_type_ids[:, position:]
    with model.hooks(fwd_hooks=hooks):
        for layer in range(starts[0], n_layers + 1):
            joined = resid.shape[0]
            if bisect_right(starts, layer) > joined:
                entry = _entry(clean, knockouts[joined:bisect_right(starts, layer)], layer,
                               position)
                resid = torch.cat([resid.to(entry.device), entry])
            if layer == n_layers:
                break
            n = resid.shape[0]
            resid = model(resid, start_at_layer=layer, stop_at_layer=layer + 1,
                          past_kv_cache=prefix.expand(n), position_ids=positions,
                          attention_mask=torch.ones(n, resid.shape[1], dtype=torch.long,
                                                    device=device),
                          token_type_ids=None if kinds is None else kinds.expand(n, -1),
                          injections=_injections(clean, removed, layer, position, n))
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
    # A DeepStack removal changes nothing in layers without an injection: drop those, so a
    # window past the injected blocks costs only the final norm.
    knockouts = [replace(k, layers=tuple(layer for layer in k.layers
                                         if layer in clean.injections))
                 if k.removes_injection else k for k in knockouts]
    # With cross-attention layers an image knockout changes only those, a text one the others.
    cross = model.cfg.text.cross_attention_layers
    if cross:
        knockouts = [replace(k, layers=tuple(layer for layer in k.layers
                                             if (layer in cross) == k.image_keys))
                     for k in knockouts]
    # Knockouts alike run once (removals whose windows cover the same injected blocks).
    first: dict[tuple, int] = {}
    same = [first.setdefault(_key(k), i) for i, k in enumerate(knockouts)]
    groups: dict[int, list[int]] = defaultdict(list)
    for index, knockout in enumerate(knockouts):
        if knockout.is_empty or same[index] != index:
            continue
        position = _start(knockout, clean.n_positions, n_layers)[0]
        # a bidirectional block (Gemma 3's image) is recomputed whole
        groups[model.family.exact_suffix_start(clean.token_type_ids, position)].append(index)
    probs = torch.empty(len(knockouts), len(tokens))
    # a knockout that blocks nothing gives the clean run's numbers: no rows to run
    probs[[i for i, k in enumerate(knockouts) if k.is_empty]] = clean.logits.softmax(-1)[
        tokens].cpu()
    for position, indices in groups.items():
        indices.sort(key=lambda i: _start(knockouts[i], clean.n_positions, n_layers)[1])
        size = batch_size if batch_size != "auto" else auto_batch_size(
            model, clean.n_positions - position, clean.n_positions, n_rows=len(indices),
            max_memory=max_memory)
        for chunk_start in range(0, len(indices), size):
            chunk = indices[chunk_start:chunk_start + size]
            rows = [knockouts[i] for i in chunk]
            probs[chunk] = _run_rows(model, clean, rows, position, tokens).cpu()
    probs = probs[same]
    return probs[:, 0] if isinstance(token, int) else probs


def _key(knockout: Knockout) -> tuple:
    return (tuple(knockout.source.tolist()), tuple(knockout.target.tolist()), knockout.layers,
            knockout.removes_injection, knockout.image_keys, knockout.key_source)

