"""The layer window of the report's word maps: centred where the task's flow drops most, NaN
values (a logit difference without a wrong answer) left out, the middle layer without any."""

import numpy as np
import pandas as pd

from mmlens.experiments.views import map_window


def _flow(values, column="change", task="ChooseAttr"):
    frame = pd.DataFrame([{"flow": "image->question", "task": task, "layer": layer,
                           "example_id": example, column: value}
                          for example, row in enumerate(values)
                          for layer, value in enumerate(row)])
    frame.attrs["window"] = 3
    return frame


def test_centred_at_the_largest_mean_drop():
    flow = _flow([[0.0, -1.0, -4.0, -1.0, 0.0, 0.0], [0.0, -3.0, -1.0, 0.0, 0.0, 0.0]],
                 column="rel_change")
    assert map_window(flow, "image->question", "ChooseAttr", 6) == [1, 2, 3]


def test_nan_values_are_left_out_and_all_nan_gives_the_middle_layer():
    flow = _flow([[np.nan, np.nan, -1.0, np.nan, np.nan, np.nan], [0.0] * 6])
    assert map_window(flow, "image->question", "ChooseAttr", 6) == [1, 2, 3]
    undefined = _flow([[np.nan] * 6, [np.nan] * 6])
    assert map_window(undefined, "image->question", "ChooseAttr", 6) == [2, 3, 4]
    assert map_window(flow, "image->last", "ChooseAttr", 6) == [2, 3, 4]
    assert map_window(flow, "image->question", "QueryAttr", 6) == [2, 3, 4]
