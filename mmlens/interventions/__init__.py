"""Interventions as composable hooks: attention knockout and the paper's layer windows."""

from mmlens.interventions.knockout import PositionSpec, block_attention, resolve_positions
from mmlens.interventions.windows import window_layers

__all__ = ["PositionSpec", "block_attention", "resolve_positions", "window_layers"]
