"""Layer windows for knockouts, with the paper's arithmetic."""

from __future__ import annotations

import math


def window_layers(center: int, k: int, n_layers: int) -> list[int]:
    """Layers ``max(0, center - k//2) .. min(n_layers, center + ceil(k/2)) - 1``.

    ``k = 9`` gives ``center-4 .. center+4``, truncated at the model's edges.
    """
    if not 0 <= center < n_layers:
        raise ValueError(f"centre layer {center} is outside the model's layers 0..{n_layers - 1}")
    if k < 1:
        raise ValueError(f"window size must be at least 1, got {k}")
    return list(range(max(0, center - k // 2), min(n_layers, center + math.ceil(k / 2))))
