"""Random controls: each flow's source swapped for a random set of the same size and modality.

    spans = control_spans(flows, spans, example_id="q1", seed=0)   # adds "random_related", ...

For a flow ``S -> T`` the control blocks ``T`` from ``|S|`` positions drawn at random from
the positions of ``S``'s kind: image positions without newline positions for an image source;
for a text source the prompt's text (system prompt, question, instruction), never the BOS
token, the last position or ``T`` itself (blocking BOS or a position from itself is a
different experiment). The draw is the same for the same seed (``--control-seed``, default
``--seed``), example and flow; the run records each example's draw in ``examples.jsonl``
(span ``random_S``). It shows how much of a flow's effect comes from blocking that many
positions at all. A source that fills its pool (``image``) has no control: the random set
would be the source itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor

from mmlens.experiments.knockouts import Flow

PREFIX = "random_"


def control_seed_of(controls: bool, control_seed: int | None, seed: int) -> int | None:
    """The seed controls are drawn from: ``control_seed``, by default ``seed`` (the data's);
    None without controls."""
    if not controls:
        return None
    return seed if control_seed is None else control_seed


def control_flow(flow: Flow) -> Flow:
    """The control of ``flow``: ``random_related->question`` for ``related->question``."""
    return Flow(PREFIX + flow.source, flow.target)


def is_control(flow_name: str) -> bool:
    return flow_name.startswith(PREFIX)


def _pool(flow: Flow, source: Tensor, spans: Mapping[str, Tensor]) -> Tensor:
    """The positions a control of ``flow`` draws from (see the module docstring)."""
    image = torch.as_tensor(spans["image"]).cpu()
    if bool(torch.isin(source, image).all()):
        pool, never = image, [spans.get("image_newline")]
    else:
        text = spans.get("text")
        if text is None:
            raise ValueError("random controls of text flows need the 'text' span: prepare the "
                             "examples with model.prepare")
        pool, never = torch.as_tensor(text).cpu(), [spans.get("bos"), spans.get("last")]
    for positions in [*never, spans[flow.target]]:
        if positions is not None:
            pool = pool[~torch.isin(pool, torch.as_tensor(positions).cpu())]
    return pool


def control_spans(flows: Iterable[Flow], spans: Mapping[str, Tensor], *, example_id: str,
                  seed: int) -> tuple[dict[str, Tensor], list[Flow]]:
    """``spans`` with a random source span added per flow, and the control flows.

    Flows whose source is empty or fills its whole modality get no control.
    """
    spans = dict(spans)
    controls = []
    for flow in flows:
        source = torch.as_tensor(spans[flow.source]).cpu()
        pool = _pool(flow, source, spans) if len(source) else source
        if len(source) == 0 or len(source) >= len(pool):
            continue
        key = hashlib.sha1(f"{seed}/{example_id}/{flow.name}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
        chosen = np.sort(rng.choice(len(pool), size=len(source), replace=False))
        control = control_flow(flow)
        spans[control.source] = pool[torch.as_tensor(chosen)]
        controls.append(control)
    return spans, controls
