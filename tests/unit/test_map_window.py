"""The layer window of the report's word maps: centred where the example's own flow drops most
(so shards merged give the views of one run), NaN values (a logit difference without a wrong
answer) left out, the middle layer without any."""

import numpy as np
import pandas as pd

from mmlens.experiments.report.views import map_window


def _flow(values, column="change"):
    frame = pd.DataFrame([{"flow": "image->question", "task": "ChooseAttr", "layer": layer,
                           "example_id": f"e{example}", column: value}
                          for example, row in enumerate(values)
                          for layer, value in enumerate(row)])
    frame.attrs["window"] = 3
    return frame


def test_centred_at_the_examples_own_largest_drop():
    flow = _flow([[0.0, -1.0, -4.0, -1.0, 0.0, 0.0], [0.0, -3.0, -1.0, 0.0, 0.0, -9.0]],
                 column="rel_change")
    assert map_window(flow, "image->question", "e0", 6) == [1, 2, 3]
    assert map_window(flow, "image->question", "e1", 6) == [4, 5]


def test_nan_values_are_left_out_and_all_nan_gives_the_middle_layer():
    flow = _flow([[np.nan, np.nan, np.nan, -1.0, np.nan, np.nan], [np.nan] * 6])
    assert map_window(flow, "image->question", "e0", 6) == [2, 3, 4]
    flow = _flow([[np.nan, -2.0, np.nan, -1.0, np.nan, np.nan], [np.nan] * 6])
    assert map_window(flow, "image->question", "e0", 6) == [0, 1, 2]
    assert map_window(flow, "image->question", "e1", 6) == [2, 3, 4]
    assert map_window(flow, "image->last", "e0", 6) == [2, 3, 4]
    assert map_window(flow, "image->question", "e9", 6) == [2, 3, 4]
