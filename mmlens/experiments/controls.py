"""Random controls: each flow's source swapped for a random set of the same size and modality.

    spans = control_spans(flows, spans, example_id="q1", seed=0)   # adds "random_related", ...

For a flow ``S -> T`` the control blocks ``T`` from ``|S|`` positions drawn at random from
``S``'s modality (image positions without newline positions, or text positions), the same
draw for the same seed, example and flow. It shows how much of a flow's effect comes from
blocking that many positions at all. A source that fills its modality (``image``) has no
control: the random set would be the source itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor

from mmlens.experiments.knockouts import Flow

PREFIX = "random_"


def control_flow(flow: Flow) -> Flow:
    """The control of ``flow``: ``random_related->question`` for ``related->question``."""
    return Flow(PREFIX + flow.source, flow.target)


def is_control(flow_name: str) -> bool:
    return flow_name.startswith(PREFIX)


def _pool(source: Tensor, spans: Mapping[str, Tensor]) -> Tensor:
    """The positions of ``source``'s modality."""
    image = torch.as_tensor(spans["image"]).cpu()
    if bool(torch.isin(source, image).all()):
        newline = spans.get("image_newline")
        if newline is not None:
            image = image[~torch.isin(image, torch.as_tensor(newline).cpu())]
        return image
    text = spans.get("text")
    if text is None:
        raise ValueError("random controls of text flows need the 'text' span: prepare the "
                         "examples with model.prepare")
    return torch.as_tensor(text).cpu()


def control_spans(flows: Iterable[Flow], spans: Mapping[str, Tensor], *, example_id: str,
                  seed: int) -> tuple[dict[str, Tensor], list[Flow]]:
    """``spans`` with a random source span added per flow, and the control flows.

    Flows whose source is empty or fills its whole modality get no control.
    """
    spans = dict(spans)
    controls = []
    for flow in flows:
        source = torch.as_tensor(spans[flow.source]).cpu()
        pool = _pool(source, spans) if len(source) else source
        if len(source) == 0 or len(source) >= len(pool):
            continue
        key = hashlib.sha1(f"{seed}/{example_id}/{flow.name}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
        chosen = np.sort(rng.choice(len(pool), size=len(source), replace=False))
        control = control_flow(flow)
        spans[control.source] = pool[torch.as_tensor(chosen)]
        controls.append(control)
    return spans, controls
