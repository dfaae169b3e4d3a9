"""Layer windows for knockouts, with the paper's arithmetic: the one place window rules live.

    >>> default_window(32), default_window(40), default_window(8)
    (7, 9, 3)
    >>> window_layers(0, 7, 32), window_layers(31, 7, 32)[-1]
    ([0, 1, 2, 3], 31)

A window is the list of layers it covers; as a half-open range it is
``[window_start, window_end)``: ``window_end`` is exclusive, one past the last blocked layer.
"""

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


def default_window(n_layers: int) -> int:
    """The paper's window: 9 for 40 layers, 7 for 32; about 7/32 of the depth, odd, otherwise."""
    if n_layers == 40:
        return 9
    if n_layers == 32:
        return 7
    k = max(1, round(n_layers * 7 / 32))
    return k if k % 2 else k + 1


def check_window(window: int | None, n_layers: int) -> int:
    """The window size to use, refusing sizes the model cannot hold."""
    if window is None:
        return min(default_window(n_layers), n_layers)
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive number of layers, got {window!r}")
    if window > n_layers:
        raise ValueError(f"window {window} is larger than the model's {n_layers} layers: pass "
                         f"a window of at most {n_layers}")
    return window
