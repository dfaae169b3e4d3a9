"""Attention knockout: block attention edges by editing ``hook_mask``.

``block_attention(src, dst, layers)`` returns ``(hook_name, fn)`` pairs for
``blocks.{l}.attn.hook_mask`` (or ``vision.blocks.{l}.attn.hook_mask``). Each fn sets the
"may attend" mask to False on every edge from a ``dst`` position (query) to a ``src`` position
(key), so the attention keeps its ``scaled_dot_product_attention`` fast path and a blocked
pre-softmax score is SET to the dtype minimum on the explicit path, never added to.

Positions are absolute positions in the (left padded) batch. With a key/value cache the
queries of a call are the last ``q_len`` key positions: destinations already in the cache are
skipped (their outputs were computed before), and positions past a run's last key are not in
that run (a prefix run that fills a cache). ``batch=`` checks positions against the batch
before anything runs; without it, a position past the end of a run raises in that run
(it would otherwise block nothing).

``ablate_positions`` replaces activations at positions with zero or a mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from numbers import Integral
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from mmlens.inputs.batch import MultimodalBatch
from mmlens.inputs.token_map import ImageLayout
from mmlens.methods.cross_knockout import cross_key_hooks, image_keys, is_image_source
from mmlens.methods.edges import blocked_edges, check_attendable

PositionSpec = str | int | Sequence[int] | Tensor | Sequence[Sequence[int] | Tensor]
"""A span name, one position, positions shared by every example, or one list per example."""

Hook = tuple[str, Callable[[Tensor, Any], Tensor | None]]

TOWERS = ("language", "vision")


def resolve_positions(
    spec: PositionSpec, batch: MultimodalBatch | None = None, *, role: str = "positions"
) -> Tensor | list[Tensor]:
    """The positions ``spec`` names: one LongTensor shared by all examples, or one per example.

    Span names are looked up in ``batch`` (``"image"``, ``"question"``, ``"last"``, ``"related"``,
    user spans). Raises for unknown names (suggesting close ones), empty spans, negative
    positions and per-example lists whose length does not match ``batch``.
    """
    if isinstance(spec, str):
        if batch is None:
            raise ValueError(f"{role}={spec!r} is a span name: pass batch= (the MultimodalBatch "
                             "whose spans it names), or give explicit positions")
        per_example = batch.prompt_span(spec, role)
        for i, positions in enumerate(per_example):
            if positions.numel() == 0:
                raise ValueError(f"{role}: span {spec!r} is empty in example {i}: there is "
                                 "nothing to select; drop that example or choose another span")
        return per_example
    if isinstance(spec, Integral) or (isinstance(spec, Tensor) and spec.ndim == 0):
        spec = [int(spec)]
    if isinstance(spec, Tensor) and spec.ndim == 1:
        spec = spec.tolist()
    items = list(spec)
    if not items:
        raise ValueError(f"{role} is empty: give at least one position")
    if all(isinstance(p, Integral) for p in items):
        return _checked(torch.tensor([int(p) for p in items], dtype=torch.long), role, None)
    per_example = [_checked(torch.as_tensor(p, dtype=torch.long).reshape(-1), role, i)
                   for i, p in enumerate(items)]
    if batch is not None and len(per_example) != len(batch):
        raise ValueError(f"{role} gives positions for {len(per_example)} examples but the batch "
                         f"has {len(batch)}: give one list per example")
    return per_example


def _tower_layout(batch: MultimodalBatch | None, model: Any) -> ImageLayout | None:
    """The image layout of the model's family (or of the batch ``prepare`` built), if known."""
    if model is not None:
        return model.family.image_layout(model)
    return None if batch is None else batch.image_layout


def _vision_positions(spec: PositionSpec, role: str,
                      layout: ImageLayout | None) -> Tensor | list[Tensor]:
    """Patch indices on the vision tower (0 = the class token where the tower has one);
    ``"cls"`` and ``"patches"`` name them, read off the family's image layout."""
    if not isinstance(spec, str):
        return resolve_positions(spec, None, role=role)
    if spec == "cls" and layout is not None and not layout.class_token:
        raise ValueError(f"{role}='cls': this model's vision tower has no class token (SigLIP "
                         "and similar towers start at patch 0): name patches with 'patches', "
                         "a span of batch= or patch indices")
    if spec == "cls":
        return torch.tensor([0])
    if spec == "patches" and layout is not None:
        return torch.arange(layout.class_offset, layout.tower_length)
    if spec == "patches":
        raise ValueError(f"{role}='patches' needs model= to know the number of patches")
    raise ValueError(f"{role}={spec!r}: on the vision tower give patch indices (0 = CLS) or "
                     "'cls' / 'patches'; text spans such as 'image' name language positions")


def _vision_spec(spec: PositionSpec, batch: MultimodalBatch | None, model: Any,
                 role: str) -> Tensor | list[Tensor]:
    """Positions on the vision tower: a span of ``batch`` mapped into the tower's patches (one
    list per vision row), ``"cls"`` / ``"patches"``, or explicit patch indices."""
    layout = _tower_layout(batch, model)
    packed = layout is not None and layout.packed
    if isinstance(spec, str) and spec in ("cls", "patches") and packed:
        raise ValueError(f"{role}={spec!r}: this model's vision tower has no class token and no "
                         "fixed patch grid (dynamic resolution): give a span name of batch= "
                         "(mapped to its patches) or packed patch indices, all images of the "
                         "call in order (see mmlens.inputs.vision_spans)")
    if not isinstance(spec, str) or spec in ("cls", "patches"):
        return _vision_positions(spec, role, layout)
    if batch is None:
        raise ValueError(f"{role}={spec!r} is a span name: on the vision tower pass batch= (the "
                         "batch from model.prepare) so the span can be mapped to the tower's "
                         "patches, or give patch indices (0 = CLS)")
    return batch.vision_positions(spec, model)


def _checked(positions: Tensor, role: str, example: int | None) -> Tensor:
    where = "" if example is None else f" of example {example}"
    if positions.numel() == 0:
        raise ValueError(f"{role}{where} is empty: give at least one position")
    if int(positions.min()) < 0:
        raise IndexError(f"{role}{where} has a negative position {int(positions.min())}: "
                         "positions are absolute indices into the padded batch")
    return positions.unique(sorted=True)


def _check_range(positions: Tensor | list[Tensor], role: str, limit: int, what: str) -> None:
    for i, pos in enumerate([positions] if isinstance(positions, Tensor) else positions):
        if pos.numel() and int(pos.max()) >= limit:
            raise IndexError(f"{role} has position {int(pos.max())} (example {i}) but {what} "
                             f"has only {limit} positions (0..{limit - 1})")


def block_attention(
    src: PositionSpec,
    dst: PositionSpec,
    layers: int | Sequence[int],
    *,
    batch: MultimodalBatch | None = None,
    heads: int | Sequence[int] | None = None,
    tower: str = "language",
    model: Any = None,
) -> list[Hook]:
    """Hooks that stop ``dst`` positions from attending to ``src`` positions in ``layers``.

    ``src`` / ``dst``: a span name of ``batch`` (``"image"``, ``"question"``, ``"last"``...),
    explicit positions for every example (``[3, 4]``), or one list per example. On the vision
    tower explicit positions are patch indices with CLS at 0 (``"cls"`` / ``"patches"`` name
    them) and a span name of ``batch`` is mapped into the tower (``batch.vision_positions``:
    one list per image, or per tile on LLaVA-NeXT); for a tower without CLS and with
    dynamic resolution (Qwen-VL) positions index the packed patches of all the call's
    images (``[1, n_patches, d]``, the processor's order) and a span name maps each image
    token to the ``merge_size**2`` patches it merges.
    ``heads`` limits the block to these heads (the mask becomes ``[batch, n_heads, q, k]``;
    this needs ``model=`` for the head count). ``model`` also lets layers, heads and vision
    positions be checked before anything runs; on a model with cross-attention layers
    (Llama-3.2-Vision) it is required: ``"image"`` then means the cross-attention keys
    (``mmlens.methods.cross_knockout``). Compose with ``+``::

        hooks = block_attention("image", "last", window_layers(l, 9, n), batch=batch)
        model.run_with_hooks(batch, fwd_hooks=hooks)
    """
    if tower not in TOWERS:
        raise ValueError(f"tower={tower!r} is not known: use 'language' or 'vision'")
    n_layers = n_heads = n_positions = None
    if model is not None:
        n_layers = model.cfg.n_layers if tower == "language" else model.cfg.vision.n_layers
        n_heads = model.cfg.n_heads if tower == "language" else model.cfg.vision.n_heads
    layout = _tower_layout(batch, model) if tower == "vision" else None
    if layout is not None:
        n_positions = layout.tower_length  # None on a packed tower: checked at each run
    layers = _check_layers(layers, n_layers, tower)
    head_list = _check_heads(heads, n_heads)
    cross = () if model is None or tower != "language" else model.cfg.text.cross_attention_layers
    if cross:
        return _cross_attention_model(src, dst, layers, set(cross), batch, head_list, n_heads)
    if tower == "vision":
        src_pos = _vision_spec(src, batch, model, "src")
        dst_pos = _vision_spec(dst, batch, model, "dst")
    else:
        src_pos = resolve_positions(src, batch, role="src")
        dst_pos = resolve_positions(dst, batch, role="dst")
    limit, what = None, ""
    if tower == "language" and batch is not None:
        limit, what = batch.input_ids.shape[1], "the batch"
    elif tower == "vision" and n_positions is not None:
        limit, what = n_positions, ("the vision tower (CLS + patches)" if layout.class_token
                                    else "the vision tower (patches, no class token)")
    if limit is not None:
        _check_range(src_pos, "src", limit, what)
        _check_range(dst_pos, "dst", limit, what)
    prefix = "vision." if tower == "vision" else ""
    strict = limit is None  # nothing to check against now: check against each run
    return [(f"{prefix}blocks.{layer}.attn.hook_mask",
             _mask_editor(src_pos, dst_pos, head_list, n_heads, layer, strict))
            for layer in layers]


def _cross_attention_model(src: PositionSpec, dst: PositionSpec, layers: list[int],
                           cross: set[int], batch: MultimodalBatch | None,
                           heads: list[int] | None, n_heads: int | None) -> list[Hook]:
    """On a model whose image reaches the text only by cross-attention: an image source blocks
    the image keys in the window's cross-attention layers, a text source the self-attention
    edges in its other layers (``mmlens.methods.cross_knockout``)."""
    dst_pos = resolve_positions(dst, batch, role="dst")
    if batch is not None:
        _check_range(dst_pos, "dst", batch.input_ids.shape[1], "the batch")
    if is_image_source(src, batch):
        return cross_key_hooks(image_keys(src, batch), dst_pos, layers, cross, heads, n_heads)
    src_pos = resolve_positions(src, batch, role="src")
    if batch is not None:
        _check_range(src_pos, "src", batch.input_ids.shape[1], "the batch")
    return [(f"blocks.{layer}.attn.hook_mask",
             _mask_editor(src_pos, dst_pos, heads, n_heads, layer, batch is None))
            for layer in layers if layer not in cross]


def _check_layers(layers: int | Sequence[int], n_layers: int | None, tower: str) -> list[int]:
    layers = [layers] if isinstance(layers, int) else list(layers)
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"layers must be integers, got {layer!r}")
        if layer < 0 or (n_layers is not None and layer >= n_layers):
            bound = "" if n_layers is None else f" of {n_layers} (0..{n_layers - 1})"
            raise ValueError(f"layer {layer} is outside the {tower} tower's layers{bound}: "
                             "window_layers(center, k, n_layers) gives valid windows")
    return sorted(set(layers))


def _check_heads(heads: int | Sequence[int] | None, n_heads: int | None) -> list[int] | None:
    if heads is None:
        return None
    heads = [heads] if isinstance(heads, int) else list(heads)
    if not heads:
        raise ValueError("heads is empty: pass None to block every head")
    if n_heads is None:
        raise ValueError("heads= needs model= to know the number of heads: "
                         "block_attention(..., heads=[1, 3], model=model)")
    bad = [h for h in heads if not 0 <= h < n_heads]
    if bad:
        raise ValueError(f"heads {bad} are outside 0..{n_heads - 1}")
    return sorted(set(heads))


def _mask_editor(
    src: Tensor | list[Tensor], dst: Tensor | list[Tensor], heads: list[int] | None,
    n_heads: int | None, layer: int, strict: bool = False,
) -> Callable[[Tensor, Any], Tensor]:
    def block_edges(mask: Bool[Tensor, "batch h q_pos k_pos"], hook: Any) -> Tensor:
        where = f"block_attention at {getattr(hook, 'name', f'layer {layer}')}"
        n, _, q_len, k_len = mask.shape
        if strict:
            _check_in_run(k_len, src, dst, where)
        for name, positions in (("src", src), ("dst", dst)):
            if isinstance(positions, list) and len(positions) != n:
                raise ValueError(f"{where}: {name} was built for a batch of {len(positions)} "
                                 f"examples but the model runs {n}: build the hooks with the "
                                 "batch you run")
        rows = n if isinstance(src, list) or isinstance(dst, list) else 1
        per_row = [(src[i] if isinstance(src, list) else src,
                    dst[i] if isinstance(dst, list) else dst) for i in range(rows)]
        blocked = blocked_edges([s for s, _ in per_row], [d for _, d in per_row], q_len, k_len,
                                mask.device)[:, None]
        if heads is not None:
            per_head = torch.zeros(blocked.shape[0], n_heads, q_len, k_len, dtype=torch.bool,
                                   device=mask.device)
            per_head[:, heads] = blocked
            blocked = per_head
            mask = mask.expand(n, n_heads, q_len, k_len)
        allowed = mask & ~blocked
        check_attendable(allowed, k_len - q_len, where)
        return allowed

    return block_edges


def _check_in_run(k_len: int, src: Tensor | list[Tensor], dst: Tensor | list[Tensor],
                  where: str) -> None:
    for role, positions in (("src", src), ("dst", dst)):
        for i, pos in enumerate([positions] if isinstance(positions, Tensor) else positions):
            if pos.numel() and int(pos.max()) >= k_len:
                raise IndexError(
                    f"{where}: {role} position {int(pos.max())} (example {i}) "
                    f"is past the end of this run's {k_len} positions (0..{k_len - 1}) and would "
                    "block nothing: give positions inside the sequence, or build the hooks with "
                    "batch= (then a prefix run leaves later positions to the run holding them)")


LANGUAGE_PREFIXES = ("blocks.", "hook_embed", "hook_token_embed", "ln_final.")
"""Hooks whose position axis is the prompt's: span names mean prompt positions there."""


def ablate_positions(
    hook_names: str | Sequence[str],
    positions: PositionSpec,
    *,
    batch: MultimodalBatch | None = None,
    means: dict[str, Tensor] | None = None,
    model: Any = None,
) -> list[Hook]:
    """Hooks that replace activations ``[batch, pos, *rest]`` at ``positions`` with zero, or with
    ``means[hook_name]`` of shape (``rest`` is e.g. ``[d_model]`` or ``[n_heads, d_head]``):

    - ``rest`` (or a shape that broadcasts to it): one value for every ablated position;
    - ``[pos, *rest]``, ``pos`` the activation's positions (e.g. ``cache[name].mean(0)``):
      each ablated position gets its own position's mean;
    - ``[n, *rest]``, ``n`` the number of ablated positions (of each example): one value per
      ablated position, in the order of ``positions``.

    Any other shape is refused, naming these.

    Positions index the activation's position axis, so use these in runs without a key/value
    cache. On language hooks ``positions`` is resolved as in ``block_attention``. On vision
    hooks (``vision.*``, rows = images, tiles on LLaVA-NeXT, or one row of every image's
    packed patches on Qwen-VL) explicit positions are patch indices (0 = CLS where there is
    one) and a span name is mapped into the tower with
    ``batch.vision_positions`` (``model=`` for a batch not built by ``model.prepare``). A span
    name on any other hook (``projector.*``...) is refused.
    """
    names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
    missing = [name for name in names if means is not None and name not in means]
    if missing:
        raise KeyError(f"means has no entry for {missing[0]}: give one per hook name, or "
                       "means=None to ablate with zero")
    hooks = []
    for name in names:
        if name.startswith("vision."):
            resolved = _vision_spec(positions, batch, model, "positions")
        elif isinstance(positions, str) and not name.startswith(LANGUAGE_PREFIXES):
            raise ValueError(f"positions={positions!r} is a span name but {name} has neither the "
                             "prompt's positions nor the vision tower's: give explicit indices "
                             "into its position axis")
        else:
            resolved = resolve_positions(positions, batch, role="positions")
        hooks.append((name, _ablator(resolved, means)))
    return hooks


def _ablator(resolved: Tensor | list[Tensor],
             means: dict[str, Tensor] | None) -> Callable[[Tensor, Any], Tensor]:
    def ablate(activation: Tensor, hook: Any) -> Tensor:
        per_example = resolved if isinstance(resolved, list) else [resolved] * len(activation)
        if len(per_example) != len(activation):
            raise ValueError(f"ablate_positions at {hook.name}: positions were given for "
                             f"{len(per_example)} examples but the model runs {len(activation)}")
        mean = None if means is None else means[hook.name].to(activation)
        ablated = activation.clone()
        for i, pos in enumerate(per_example):
            if not pos.numel():
                continue  # a vision row (tile) the span does not touch
            if int(pos.max()) >= activation.shape[1]:
                raise IndexError(f"ablate_positions at {hook.name}: position {int(pos.max())} "
                                 f"is past the activation's {activation.shape[1]} positions")
            pos = pos.to(activation.device)
            ablated[i, pos] = 0.0 if mean is None else _mean_at(mean, pos, activation, hook.name)
        return ablated

    return ablate


def _mean_at(mean: Tensor, pos: Tensor, activation: Tensor, name: str) -> Tensor:
    """The replacement values ``[len(pos), *rest]`` from a mean of one of the documented shapes."""
    rest = tuple(activation.shape[2:])
    shape = tuple(mean.shape)
    if shape == (activation.shape[1], *rest):
        return mean[pos]
    if shape == (len(pos), *rest):
        return mean
    if len(shape) <= len(rest) and _broadcasts(shape, rest):
        return mean.expand(len(pos), *rest)
    raise ValueError(
        f"ablate_positions at {name}: means has shape {list(shape)}; give {list(rest)} (one "
        f"value for every position), [{activation.shape[1]}, *{list(rest)}] (a mean per "
        f"position of the activation [batch, {activation.shape[1]}, *{list(rest)}]) or "
        f"[{len(pos)}, *{list(rest)}] (one per ablated position, in order)")


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False
