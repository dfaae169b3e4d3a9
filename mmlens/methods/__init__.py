"""Interventions as composable hooks: attention knockout, position ablation, layer windows."""

from mmlens.methods.causal_map import causal_map
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
    "resolve_positions",
    "window_layers",
]
