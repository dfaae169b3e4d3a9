"""Interventions as composable hooks: attention knockout, position ablation, DeepStack
removal, layer windows."""

from mmlens.methods.causal_map import causal_map
from mmlens.methods.deepstack import remove_deepstack
from mmlens.methods.knockout import (
    PositionSpec,
    ablate_positions,
    block_attention,
    resolve_positions,
)
from mmlens.methods.windows import window_layers

__all__ = [
    "PositionSpec",
    "ablate_positions",
    "block_attention",
    "causal_map",
    "remove_deepstack",
    "resolve_positions",
    "window_layers",
]
