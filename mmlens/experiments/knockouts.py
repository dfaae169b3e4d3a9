"""Flows ("SRC->DST" between named spans), layer windows, and the knockouts they expand to.

    >>> parse_flows(["image->question", "question->last"])
    [Flow(source='image', target='question'), Flow(source='question', target='last')]

A flow names two spans of a ``MultimodalBatch`` (``image``, ``question``, ``last``,
``related``, ``other``, or any span you add); a knockout of that flow at centre layer ``l``
blocks every attention edge from a target position to a source position in the layers
``window_layers(l, k, n_layers)`` (``mmlens.methods.windows`` holds every window rule;
``default_window`` and ``check_window`` are re-exported here).
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mmlens.core.errors import MMLensError
from mmlens.methods.windows import check_window, default_window, window_layers

__all__ = ["DEEPSTACK", "DEFAULT_FLOWS", "Flow", "Knockout", "WindowKnockout",
           "check_flow_spans", "check_window", "default_window", "flow_spans", "parse_flow",
           "parse_flows", "window_knockouts"]

DEFAULT_FLOWS: tuple[str, ...] = (
    "image->question",
    "image->last",
    "question->last",
    "last->last",
    "related->question",
    "other->question",
)
"""The six flows of the paper."""

DEEPSTACK = "deepstack"
"""The source span of flows that remove Qwen3-VL's DeepStack features instead of blocking
attention: ``"deepstack->image"`` drops what DeepStack adds to the image tokens (or, e.g.,
``"deepstack->related"``, to those of the target span) in the window's layers. The span is the
image tokens, where the features are added."""


@dataclass(frozen=True)
class Flow:
    """Information flowing from the ``source`` span to the ``target`` span."""

    source: str
    target: str

    @property
    def name(self) -> str:
        return f"{self.source}->{self.target}"


@dataclass(frozen=True)
class Knockout:
    """Block attention from ``target`` to ``source`` positions in ``layers``.

    ``source`` / ``target`` are LongTensors of absolute positions in one example's prompt.
    """

    source: Tensor
    target: Tensor
    layers: tuple[int, ...]
    removes_injection: bool = False
    """A ``deepstack->...`` flow: the DeepStack features added at ``target`` after ``layers``
    are removed; no attention edge is blocked."""
    image_keys: bool = False
    """An image flow on a model whose image reaches the text only by cross-attention
    (Llama-3.2-Vision): ``target`` is blocked from image keys in the window's cross-attention
    layers: from every key (``image->...``; ``source`` is the image token, unused), or with
    ``key_source`` from the keys ``source`` holds (a key span: ``related`` / ``other``)."""
    key_source: bool = False

    @property
    def is_empty(self) -> bool:
        return not (len(self.source) and len(self.target) and self.layers)


@dataclass(frozen=True)
class WindowKnockout:
    """One cell of the sweep: a flow knocked out in the window around a centre layer."""

    flow: str
    layer: int
    knockout: Knockout

    @property
    def window_start(self) -> int:
        return self.knockout.layers[0]

    @property
    def window_end(self) -> int:
        return self.knockout.layers[-1] + 1


def parse_flow(flow: str | Flow | tuple[str, str]) -> Flow:
    """A ``Flow`` from ``"SRC->DST"``, ``(src, dst)`` or a ``Flow``."""
    if isinstance(flow, Flow):
        return flow
    if isinstance(flow, tuple) and len(flow) == 2:
        source, target = flow
    elif isinstance(flow, str) and flow.count("->") == 1:
        source, target = (part.strip() for part in flow.split("->"))
    else:
        raise ValueError(f"cannot read flow {flow!r}: write it as 'SOURCE->TARGET' with span "
                         f"names, e.g. 'image->question'")
    if not source or not target:
        raise ValueError(f"flow {flow!r} misses a span name: write 'SOURCE->TARGET'")
    return Flow(str(source), str(target))


def parse_flows(flows: str | Iterable[str | Flow | tuple[str, str]]) -> list[Flow]:
    """Flows from a list, or from one comma-separated string ``"image->last,question->last"``."""
    if isinstance(flows, str):
        flows = [part for part in flows.split(",") if part.strip()]
    parsed = [parse_flow(flow) for flow in flows]
    if not parsed:
        raise ValueError("no flows given: pass at least one 'SOURCE->TARGET'")
    names = [flow.name for flow in parsed]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"flows {duplicates} are given more than once: list each flow once")
    return parsed


def check_flow_spans(flows: Iterable[Flow], span_names: Iterable[str]) -> None:
    """Raise for a flow naming a span the examples do not have."""
    known = sorted(set(span_names))
    for flow in flows:
        for span in (flow.source, flow.target):
            if span not in known:
                close = difflib.get_close_matches(span, known, n=3, cutoff=0.5)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise ValueError(f"flow {flow.name!r} names an unknown span {span!r}.{hint} "
                                 f"Known spans: {', '.join(known)}; add your own with spans=...")


def window_knockouts(
    flows: Iterable[Flow], spans: Mapping[str, Tensor], window: int, n_layers: int, *,
    cross_attention: bool = False, key_spans: Collection[str] = (),
) -> list[WindowKnockout]:
    """Every (flow, centre layer) knockout of one example, flows outer, layers inner;
    ``cross_attention``: the model's image is in its cross-attention keys, not in the prompt
    (flows from ``image`` or from a span of ``key_spans``, which hold key indices, block those
    keys, ``Knockout.image_keys``)."""
    cells = []
    for flow in flows:
        source = torch.as_tensor(spans[flow.source], dtype=torch.long).cpu()
        target = torch.as_tensor(spans[flow.target], dtype=torch.long).cpu()
        for centre in range(n_layers):
            layers = tuple(window_layers(centre, window, n_layers))
            cells.append(WindowKnockout(flow.name, centre, Knockout(
                source, target, layers, removes_injection=flow.source == DEEPSTACK,
                image_keys=cross_attention and (flow.source == "image"
                                                or flow.source in key_spans),
                key_source=flow.source in key_spans)))
    return cells


def flow_spans(spans: Mapping[str, Tensor], model: Any,
               flows: Iterable[Flow] = ()) -> dict[str, Tensor]:
    """An example's spans plus ``deepstack`` (its image tokens) on a model with DeepStack;
    raises for a ``deepstack->...`` flow on a model without."""
    out = dict(spans)
    if getattr(model.cfg.text, "deepstack_layers", 0) and "image" in spans:
        out[DEEPSTACK] = spans["image"]
    elif any(flow.source == DEEPSTACK for flow in flows):
        raise MMLensError(f"flows from {DEEPSTACK!r} remove DeepStack features, which this "
                          f"model ({model.cfg.model_type}) does not add: drop those flows")
    return out
