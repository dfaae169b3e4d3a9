"""window_layers: the paper's window arithmetic, truncated at the model's edges."""

import pytest

from mmlens.methods import window_layers


@pytest.mark.parametrize("center, k, n_layers, expected", [
    (10, 9, 32, list(range(6, 15))),  # k = 9: l-4 .. l+4
    (10, 7, 32, list(range(7, 14))),
    (10, 8, 32, list(range(6, 14))),  # even k: l-4 .. l+3
    (0, 9, 32, list(range(0, 5))),
    (2, 9, 32, list(range(0, 7))),
    (31, 9, 32, list(range(27, 32))),
    (39, 9, 40, list(range(35, 40))),
    (5, 1, 32, [5]),
    (1, 9, 3, [0, 1, 2]),
])
def test_window(center, k, n_layers, expected):
    assert window_layers(center, k, n_layers) == expected


def test_every_centre_is_inside_its_window():
    for center in range(32):
        window = window_layers(center, 9, 32)
        assert center in window and window == list(range(window[0], window[-1] + 1))


@pytest.mark.parametrize("center, k, message", [
    (32, 9, "centre layer 32 is outside the model's layers 0..31"),
    (-1, 9, "centre layer -1 is outside"),
    (3, 0, "window size must be at least 1, got 0"),
])
def test_bad_windows(center, k, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        window_layers(center, k, 32)
