"""Removing Qwen3-VL's DeepStack injections: hooks that zero the vision features added after
the first decoder blocks (``blocks.{l}.hook_deepstack``), at every image token or only at
chosen positions.

    model.run_with_hooks(batch, fwd_hooks=remove_deepstack(model, [0, 1]))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from jaxtyping import Float
from torch import Tensor

from mmlens.core.errors import MMLensError

Hook = tuple[str, Callable[[Tensor, Any], Tensor]]


def deepstack_layers(model: Any) -> list[int]:
    """The decoder blocks whose outputs receive DeepStack features (none for most families)."""
    return list(range(getattr(model.cfg.text, "deepstack_layers", 0)))


def remove_deepstack(model: Any, layers: int | Sequence[int],
                     positions: Tensor | Sequence[Tensor] | None = None) -> list[Hook]:
    """Forward hooks removing the DeepStack features added after each block in ``layers``.

    ``positions``: None removes them everywhere; a LongTensor of positions (every example) or
    one per example removes them there only. Raises for a layer with no injection.
    """
    layers = [layers] if isinstance(layers, int) else list(layers)
    available = deepstack_layers(model)
    wrong = [layer for layer in layers if layer not in available]
    if wrong or not layers:
        where = (f"blocks {available[0]}-{available[-1]}" if available
                 else "no block (this family has no DeepStack)")
        raise MMLensError(f"no DeepStack features are added after block(s) {wrong or layers}: "
                          f"this model adds them after {where}")
    return [(f"blocks.{layer}.hook_deepstack", _zeroer(positions)) for layer in layers]


def _zeroer(positions: Tensor | Sequence[Tensor] | None
            ) -> Callable[[Float[Tensor, "batch pos d_model"], Any], Tensor]:
    def hook(features: Tensor, hook: Any) -> Tensor:
        if positions is None:
            return features.new_zeros(features.shape)
        out = features.clone()
        if isinstance(positions, Tensor):
            out[:, positions.to(out.device)] = 0
        else:
            if len(positions) != out.shape[0]:
                raise MMLensError(f"remove_deepstack got positions for {len(positions)} "
                                  f"examples but the batch holds {out.shape[0]}")
            for row, where in enumerate(positions):
                out[row, where.to(out.device)] = 0
        return out

    return hook
