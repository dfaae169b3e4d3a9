"""Interventions as composable hooks: attention knockout, position ablation, layer windows."""

from mmlens.interventions.knockout import (
    PositionSpec,
    ablate_positions,
    block_attention,
    resolve_positions,
)
from mmlens.interventions.windows import window_layers

__all__ = [
    "PositionSpec",
    "ablate_positions",
    "block_attention",
    "resolve_positions",
    "window_layers",
]
