"""The per-task summary finds the peak drop and its half-height range on hand-made curves."""


import pandas as pd
import pytest

from mmlens.experiments.report.captions import flow_caption
from mmlens.experiments.summary import flow_summary


def _frame(curves: dict[tuple[str, str], list[float]]) -> pd.DataFrame:
    rows = []
    for (task, flow), values in curves.items():
        for example in ("a", "b"):
            for layer, value in enumerate(values):
                # the two examples straddle the curve, so the mean is the curve itself
                offset = 1.0 if example == "a" else -1.0
                rows.append({"example_id": f"{task}-{example}", "task": task, "flow": flow,
                             "layer": layer, "rel_change": value + offset})
    return pd.DataFrame(rows)


def test_peak_and_half_range():
    frame = _frame({("ChooseAttr", "question->last"): [0, -5, -30, -60, -35, -10, 0],
                    ("ChooseAttr", "last->last"): [1, 2, 0.5, 3, 1, 0, 2]})
    summary = flow_summary(frame).set_index(["task", "flow"])
    row = summary.loc[("ChooseAttr", "question->last")]
    assert row.peak_layer == 3 and row.peak_change == pytest.approx(-60)
    assert (row.half_start, row.half_end) == (2, 4)  # -30 and -35 are at least half of -60
    flat = summary.loc[("ChooseAttr", "last->last")]
    assert flat.peak_change >= 0 and pd.isna(flat.half_start)
    assert ("all", "question->last") in summary.index
    assert summary.loc[("ChooseAttr", "question->last")].n_examples == 2


def test_missing_columns_raise():
    with pytest.raises(ValueError, match="lacks columns"):
        flow_summary(pd.DataFrame({"flow": [], "layer": []}))


def test_bootstrap_intervals_follow_the_spread_of_examples():
    import numpy as np

    rng = np.random.default_rng(1)
    curve = np.array([0, -10, -40, -20, 0.0])
    rows = []
    for example in range(40):
        noise = rng.normal(0, 5)
        for layer, value in enumerate(curve):
            for flow, spread in (("noisy->last", noise), ("exact->last", 0.0)):
                rows.append({"example_id": str(example), "task": "T", "flow": flow,
                             "layer": layer, "rel_change": value + spread})
    summary = flow_summary(pd.DataFrame(rows), n_boot=400).set_index(["task", "flow"])
    exact = summary.loc[("T", "exact->last")]
    assert exact.peak_change_low == exact.peak_change == exact.peak_change_high == -40
    assert exact.peak_layer_low == exact.peak_layer_high == 2
    noisy = summary.loc[("T", "noisy->last")]
    # a 95% interval of a mean of 40 draws with sd 5: about +-1.55 around the mean
    assert noisy.peak_change_low < noisy.peak_change < noisy.peak_change_high
    assert 2.0 < noisy.peak_change_high - noisy.peak_change_low < 4.5
    assert str(summary.peak_layer.dtype) == "Int64"


def _noisy(flows: list[str], n_examples: int = 30) -> pd.DataFrame:
    import numpy as np

    rows = []
    for flow in flows:
        rng = np.random.default_rng(len(flow))  # each flow's own values, whatever else is there
        for example in range(n_examples):
            noise = rng.normal(0, 5)
            for layer, value in enumerate([0, -10, -40, -20, 0.0]):
                rows.append({"example_id": str(example), "task": "T", "flow": flow,
                             "layer": layer, "rel_change": value + noise})
    return pd.DataFrame(rows)


def test_a_groups_interval_does_not_move_when_flows_or_controls_are_added():
    alone = flow_summary(_noisy(["question->last"]), n_boot=200)
    crowded = flow_summary(_noisy(["image->last", "question->last", "random_question->last"]),
                           n_boot=200)
    columns = [c for c in alone.columns if c.endswith(("_low", "_high"))]
    for task in ("T", "all"):
        a = alone[(alone.task == task) & (alone.flow == "question->last")][columns]
        b = crowded[(crowded.task == task) & (crowded.flow == "question->last")][columns]
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
    # the noise is real: the interval has width, and another seed moves it
    other = flow_summary(_noisy(["question->last"]), n_boot=200, seed=1)
    assert (alone.peak_change_high - alone.peak_change_low).min() > 0.5
    assert not other.peak_change_low.equals(alone.peak_change_low)


def test_n_examples_counts_only_examples_with_a_value():
    frame = _frame({("ChooseAttr", "question->last"): [0, -5, -30, -60, -35, -10, 0],
                    ("LogicalObj", "question->last"): [0, -5, -30, -60, -35, -10, 0]})
    # logit-diff: the LogicalObj questions have no wrong option, so no value
    frame = frame.rename(columns={"rel_change": "change"})
    frame.loc[frame.task == "LogicalObj", "change"] = float("nan")
    summary = flow_summary(frame, n_boot=50).set_index(["task", "flow"])
    assert summary.loc[("ChooseAttr", "question->last")].n_examples == 2
    assert summary.loc[("LogicalObj", "question->last")].n_examples == 0
    assert pd.isna(summary.loc[("LogicalObj", "question->last")].peak_change)
    everything = summary.loc[("all", "question->last")]
    assert everything.n_examples == 2 and everything.peak_change == pytest.approx(-60)
    # the caption repeats the count of examples with a value, not of rows
    text = flow_caption(summary.reset_index(), "question->last", window=3, n_layers=7)
    assert "; 2 examples." in text
