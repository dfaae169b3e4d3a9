"""``InputsModel``: what ``prepare`` and the span builders use of a model.

``inputs`` sits below ``model`` in the package's layers, so it names the little it needs here
instead of importing the model: its processor, its config (``image_token_id``, the vision
geometry) and its family (how pixel values stack, extra image spans, boxes -> positions).
``HookedMultimodalTransformer`` has all three.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class InputsModel(Protocol):
    processor: Any
    cfg: Any
    family: Any
