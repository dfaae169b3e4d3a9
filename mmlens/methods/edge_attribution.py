"""Edge attribution: the effect of blocking span -> span attention edges, estimated from gradients.

A knockout of the flow ``source -> target`` in layer ``l`` removes the edges (target query,
source key) from the softmax of every head. Give those edges a mask strength ``a`` in
``[0, 1]``: each row of the pattern keeps ``p * (1 - a)`` at the blocked keys, ``p``
elsewhere, renormalised, which is adding ``log(1 - a)`` to their pre-softmax scores; ``a = 0``
is the clean run, ``a = 1`` exactly the knockout. The estimates of ``metric(a=1) -
metric(a=0)``, per (flow, layer[, head]):

- ``"atp"``: the linear term ``d metric / d a`` at ``a = 0`` (one forward, one backward);
- ``"atp*"``: AtP*'s saturation fix (Kramar et al. 2024): the pattern with the edges removed
  is recomputed exactly, row by row, and only the step from pattern to metric is linear:
  ``sum (p_blocked - p) * d metric / d p``. Same cost as ``"atp"``;
- ``"ig"``: integrated gradients: each group (flow, layer[, head]) on its own path, ``d
  metric / d a`` averaged at the ``steps`` midpoints ``a = (k + 1/2) / steps``; as ``steps``
  grows it becomes that group's knockout effect exactly (completeness). ``groups x steps``
  passes, stacked ``batch_size`` rows at a time.

``graddrop=True`` adds AtP*'s GradDrop for ``"atp"`` / ``"atp*"``: the estimate is taken once
per layer ``d`` with the backward pass through that layer's residual contributions (its
attention and MLP outputs) cut, and the score is ``sum_d |estimate_d| / (n_layers - 1)``: a
magnitude that surfaces edges whose direct and indirect effects cancel (``n_layers`` more
forwards and backwards).

Heads are the query heads (``hook_pattern``'s); with grouped-query attention the heads that
share a key/value head are blocked and scored one by one, as ``block_attention(heads=...)``
blocks them.

Where the image is read by cross-attention (Llama-3.2-Vision), a flow from an image source
(``"image"``: every key, or a key span such as ``"related"``) is a set of cross-attention edges
(text query, image key) scored in the cross-attention layers (``cross_attn.hook_pattern``),
and a flow between text spans self-attention edges scored in the other layers; a flow scores 0
in layers of the other kind, as ``block_attention(..., model=)`` leaves them alone. A row that
loses every key (``"image"``) gets zero output at ``a = 1`` (the knockout's rule): its pattern
is ``p * (1 - a)``, so there the linear term is ``-sum p * d metric / d p``. These runs are
full forwards (a run cannot resume before a cross-attention layer without the image).

    frame = edge_attribution(model, batch, answer_prob_metric(answer), method="atp*")
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from mmlens.inputs.batch import MultimodalBatch
from mmlens.methods.cross_knockout import cross_mask_editor, image_keys, is_image_source
from mmlens.methods.edges import blocked_edges, check_attendable
from mmlens.model.protocol import HookedModel

EDGE_FLOWS: tuple[str, ...] = ("image->question", "image->last", "question->last")
"""The span -> span flows scored by default."""

METHODS = ("atp", "atp*", "ig")

Metric = Callable[[Tensor], Tensor]


def edge_attribution(
    model: HookedModel, batch: MultimodalBatch, metric: Metric, *,
    flows: Sequence[str] = EDGE_FLOWS, layers: Sequence[int] | None = None,
    heads: bool | Sequence[int] = False, method: str = "atp", steps: int = 16,
    graddrop: bool = False, batch_size: int = 32,
) -> pd.DataFrame:
    """Estimated ``metric(blocked) - metric(clean)`` per flow and layer (and head): a tidy
    frame with columns ``flow``, ``layer``, (``head``,) ``score``.

    ``metric`` maps logits ``[batch, pos, d_vocab]`` to a scalar (e.g. ``answer_prob_metric``).
    ``heads=False`` blocks all heads of a layer together; ``True`` scores every head; a list
    scores those heads only. ``steps``: integrated-gradients steps (``method="ig"``), each
    group on its own path; ``batch_size`` bounds the rows (examples x groups) per pass.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not known: use one of {', '.join(METHODS)}")
    if graddrop and method == "ig":
        raise ValueError("graddrop applies to method 'atp' or 'atp*', not to 'ig'")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be at least 1, got {steps}, {batch_size}")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad or not layers:
        raise ValueError(f"layers {bad or '[]'} are not layers of this model: give some of "
                         f"0..{n_layers - 1}")
    head_list = _heads(heads, n_heads)
    flows = list(flows)
    if not flows:
        raise ValueError("no flows given: pass at least one 'SOURCE->TARGET'")
    cross = model.cfg.text.cross_attention_layers
    blocked = _blocked(batch, [f for f in flows if not _is_cross(f, batch, cross)])
    blocked = {"attn": _with_zeros(blocked, flows, batch, cross)}
    if cross:
        blocked["cross_attn"] = _cross_blocked(model, batch, flows)
    shape = (len(flows), len(layers), 1 if head_list is None else len(head_list))
    run = _Run(model, batch, metric, blocked, layers, head_list)
    if method == "ig":
        scores = run.integrated_gradients(shape, steps, max(1, batch_size // len(batch)))
    elif not graddrop:
        scores = run.estimate(shape, corrected=method == "atp*")
    else:
        scores = sum(run.estimate(shape, corrected=method == "atp*", drop=d).abs()
                     for d in range(n_layers)) / max(n_layers - 1, 1)
    return _frame(scores, flows, layers, head_list)


def _heads(heads: bool | Sequence[int], n_heads: int) -> list[int] | None:
    if heads is False:
        return None
    head_list = list(range(n_heads)) if heads is True else [int(h) for h in heads]
    bad = [h for h in head_list if not 0 <= h < n_heads]
    if bad or not head_list or len(set(head_list)) != len(head_list):
        raise ValueError(f"heads {list(heads)} are not distinct heads of this model: give some "
                         f"of 0..{n_heads - 1}, or True for all")
    return head_list


def _split(flow: Any, batch: MultimodalBatch) -> tuple[str, str]:
    if not isinstance(flow, str) or flow.count("->") != 1:
        raise ValueError(f"cannot read flow {flow!r}: write it as 'SOURCE->TARGET'")
    source, target = (part.strip() for part in flow.split("->"))
    missing = [name for name in (source, target) if name not in batch.span_names]
    if missing:
        raise ValueError(f"flow {flow!r}: the batch has no span {missing[0]!r}; its spans "
                         f"are {', '.join(batch.span_names)}")
    return source, target


def _is_cross(flow: Any, batch: MultimodalBatch, cross: Sequence[int]) -> bool:
    """Whether ``flow`` is a set of cross-attention edges (an image source, on a model that
    reads its image by cross-attention)."""
    return bool(cross) and is_image_source(_split(flow, batch)[0], batch)


def _with_zeros(blocked: Tensor | None, flows: list[str], batch: MultimodalBatch,
                cross: Sequence[int]) -> Tensor:
    """``blocked`` (the self-attention flows') with an empty entry for each cross flow."""
    n, n_pos = batch.input_ids.shape
    rows = iter([] if blocked is None else blocked)
    return torch.stack([torch.zeros(n, n_pos, n_pos, dtype=torch.bool)
                        if _is_cross(f, batch, cross) else next(rows) for f in flows])


def _cross_blocked(model: HookedModel, batch: MultimodalBatch, flows: list[str]) -> Tensor:
    """The cross-attention edges of each flow ``[flows, batch, text, keys]`` (empty for a
    text flow): every (target, key) edge of its image source."""
    name = f"blocks.{model.cfg.text.cross_attention_layers[0]}.cross_attn.hook_mask"
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=name.__eq__)
    opened = torch.ones_like(cache[name][:, :1], dtype=torch.bool).cpu()
    per_flow = []
    for flow in flows:
        source, target = _split(flow, batch)
        if not is_image_source(source, batch):
            per_flow.append(torch.zeros_like(opened[:, 0]))
            continue
        block = cross_mask_editor(image_keys(source, batch), batch.prompt_span(
            target, "edge attribution"), None, None, 0)
        per_flow.append(~block(opened, None)[:, 0])
    blocked = torch.stack(per_flow)
    if bool((blocked.sum(0) > 1).any()):
        raise ValueError(f"flows {flows} share edges: score flows that block different edges "
                         "(or score them in separate calls)")
    return blocked


def _blocked(batch: MultimodalBatch, flows: list[str]) -> Tensor | None:
    """The edges of each flow ``[flows, batch, q_pos, k_pos]`` (True = blocked)."""
    if not flows:
        return None
    n_pos = batch.input_ids.shape[1]
    per_flow = []
    for flow in flows:
        source, target = _split(flow, batch)
        edges = blocked_edges(batch.prompt_span(source, "edge attribution"),
                              batch.prompt_span(target, "edge attribution"), n_pos, n_pos)
        causal = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
        check_attendable((causal & ~edges)[:, None], 0, f"edge attribution of {flow!r}")
        per_flow.append(edges)
    blocked = torch.stack(per_flow)
    if bool((blocked.sum(0) > 1).any()):
        raise ValueError(f"flows {flows} share edges: score flows that block different edges "
                         "(or score them in separate calls)")
    return blocked


class _Run:
    """Forward/backward passes with the flows' edges at given mask strengths.

    Layers below the first scored one are the same at every strength, so each pass resumes
    from the residual stream entering it. A pass stacks ``R`` copies of the batch, copy ``r``
    at strengths ``strength[r]`` ``[flows, layers, heads]``; the metric is taken per copy and
    summed, so each copy's gradient is its own.
    """

    def __init__(self, model: Any, batch: MultimodalBatch, metric: Metric,
                 blocked: dict[str, Tensor], layers: list[int], head_list: list[int] | None):
        self.model, self.metric = model, metric
        self.layers, self.head_list = layers, head_list
        cross = model.cfg.text.cross_attention_layers
        # per scored layer: its attention module and the flows' edges there
        self.kinds = ["cross_attn" if layer in cross else "attn" for layer in layers]
        self.blocked = [blocked[kind] for kind in self.kinds]
        self.first = 0 if cross else min(layers)
        self.batch, self.n = batch, len(batch)
        start = f"blocks.{self.first}.hook_resid_pre"
        if not cross:
            with torch.no_grad():
                _, cache = model.run_with_cache(batch, names_filter=start.__eq__)
            self.start = cache[start]
        self.mask = batch.attention_mask
        self.positions = model.position_ids(batch.input_ids, batch.attention_mask,
                                            image_sizes=batch.image_sizes)

    def gradient(self, strength: Tensor, drop: int | None = None,
                 ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """``d metric / d strength`` (``strength``'s shape) and each layer's (pattern,
        d metric / d pattern)."""
        copies = strength.shape[0]
        strength = strength.clone().requires_grad_(True)
        patterns: list[Tensor] = []
        hooks = [(f"blocks.{layer}.{kind}.hook_pattern", self._edit(strength, i, patterns))
                 for i, (layer, kind) in enumerate(zip(self.layers, self.kinds, strict=True))]
        if drop is not None:
            hooks += [(f"blocks.{drop}.hook_{part}_out", _cut_gradient) for part in ("attn", "mlp")]
        with torch.enable_grad(), self.model.hooks(fwd_hooks=hooks):
            logits = self._forward(copies)
            values = [self.metric(part) for part in logits.split(self.n)]
            if values[0].ndim != 0:
                raise ValueError(f"the metric returned shape {tuple(values[0].shape)}: edge "
                                 "attribution needs a scalar (average over the batch)")
            grads = torch.autograd.grad(sum(values), [strength, *patterns], allow_unused=True)
        kept = [(p.detach(), torch.zeros_like(p) if g is None else g.detach())
                for p, g in zip(patterns, grads[1:], strict=True)]
        first = grads[0] if grads[0] is not None else torch.zeros_like(strength)
        return first.detach(), kept

    def _forward(self, copies: int) -> Tensor:
        """Logits of ``copies`` stacked copies of the batch: resumed at the first scored layer,
        or whole where the image is read by cross-attention."""
        if self.model.cfg.text.cross_attention_layers:
            batch = self.batch
            return self.model(
                batch.input_ids.repeat(copies, 1),
                batch.pixel_values.repeat(copies, *[1] * (batch.pixel_values.ndim - 1)),
                attention_mask=self.mask.repeat(copies, 1),
                image_sizes=None if batch.image_sizes is None else batch.image_sizes.repeat(
                    copies, *[1] * (batch.image_sizes.ndim - 1)))
        return self.model(
            self.start.repeat(copies, 1, 1), start_at_layer=self.first,
            attention_mask=self.mask.repeat(copies, 1),
            position_ids=self.positions.repeat(*[1] * (self.positions.ndim - 2), copies, 1))

    def integrated_gradients(self, shape: tuple[int, ...], steps: int,
                             per_pass: int) -> Tensor:
        """Each group alone moved from strength 0 to 1: mean gradient at the midpoints."""
        groups = list(itertools.product(*(range(size) for size in shape)))
        scores = torch.zeros(shape)
        for first in range(0, len(groups), per_pass):
            chunk = groups[first:first + per_pass]
            for step in range(steps):
                strength = torch.zeros(len(chunk), *shape)
                for row, group in enumerate(chunk):
                    strength[(row, *group)] = (step + 0.5) / steps
                grad, _ = self.gradient(strength)
                for row, group in enumerate(chunk):
                    scores[group] += grad[(row, *group)] / steps
        return scores

    def estimate(self, shape: tuple[int, ...], corrected: bool, drop: int | None = None) -> Tensor:
        """At strength 0: the linear term in the blocked edges' mask-logits (``atp``), or the
        pattern recomputed with them removed and linear from there on (``atp*``)."""
        _, kept = self.gradient(torch.zeros(1, *shape), drop)
        scores = torch.zeros(shape)
        for i, (pattern, pattern_grad) in enumerate(kept):
            dtype = torch.promote_types(pattern.dtype, torch.float32)
            pattern, pattern_grad = pattern.to(dtype), pattern_grad.to(dtype)
            for f, edges in enumerate(self.blocked[i].to(pattern.device)):
                edges = edges[:, None]  # [batch, 1, q, k]
                if corrected:
                    terms = (_knocked_out(pattern, edges) - pattern) * pattern_grad
                else:  # d metric / d (logits of the blocked keys), times -1: they go down;
                    # a row left with no key (cross-attention) only loses its mass
                    kept_mass = (pattern.masked_fill(edges, 0).sum(-1, keepdim=True) > 0)
                    weighted = (pattern * pattern_grad).sum(-1, keepdim=True) * kept_mass
                    terms = -(pattern * edges) * (pattern_grad - weighted)
                per_head = terms.sum((0, 2, 3)).cpu()
                scores[f, i] = (per_head.sum(0, keepdim=True) if self.head_list is None
                                else per_head[self.head_list])
        return scores

    def _edit(self, strength: Tensor, index: int, patterns: list[Tensor]):
        blocked, head_list = self.blocked[index], self.head_list

        def hook(pattern: Tensor, hook: Any) -> Tensor:
            n_heads = pattern.shape[1]
            per_head = strength[:, :, index].to(pattern.device, pattern.dtype)  # [R, F, heads]
            if head_list is None:
                per_head = per_head.expand(-1, -1, n_heads)
            else:
                per_head = torch.zeros(*per_head.shape[:2], n_heads, dtype=pattern.dtype,
                                       device=pattern.device).index_copy(
                    2, torch.tensor(head_list, device=pattern.device), per_head)
            edges = blocked.to(pattern.device, pattern.dtype)
            # Flows block disjoint edges: edge weights 1 - sum_f a_f B_f; the mass taken off
            # goes to the keys no flow blocks, in proportion, so a = 1 is the knockout itself
            # (a row with no such key keeps p * (1 - a): zero output at a = 1, as knocked out).
            cut = torch.einsum("rfh,fbqk->rbhqk", per_head, edges).flatten(0, 1)
            removed = pattern * cut
            free = pattern * (1 - edges.sum(0)).repeat(len(per_head), 1, 1)[:, None]
            share = free / free.sum(-1, keepdim=True).clamp_min(torch.finfo(pattern.dtype).tiny)
            edited = pattern - removed + removed.sum(-1, keepdim=True) * share
            patterns.append(edited)
            return edited

        return hook


def _knocked_out(pattern: Tensor, edges: Tensor) -> Tensor:
    """Each row of ``pattern`` with its blocked keys removed and renormalised."""
    remaining = pattern.masked_fill(edges, 0)
    total = remaining.sum(-1, keepdim=True)
    # a row with no key left (cross-attention) is zero, the knockout's rule
    renormalised = torch.where(total > 0, remaining / total.clamp_min(torch.finfo(
        total.dtype).tiny), remaining)
    return torch.where(edges.any(-1, keepdim=True), renormalised, pattern)


def _cut_gradient(activation: Tensor, hook: Any) -> Tensor:
    """The same values, but no gradient flows back through this residual contribution."""
    return activation.detach()


def _frame(scores: Tensor, flows: list[str], layers: list[int],
           head_list: list[int] | None) -> pd.DataFrame:
    rows = []
    for f, flow in enumerate(flows):
        for i, layer in enumerate(layers):
            if head_list is None:
                rows.append({"flow": flow, "layer": layer, "score": float(scores[f, i, 0])})
                continue
            rows.extend({"flow": flow, "layer": layer, "head": head,
                         "score": float(scores[f, i, j])} for j, head in enumerate(head_list))
    return pd.DataFrame(rows)
