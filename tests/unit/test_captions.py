"""Report captions follow the data: move the peak in a synthetic table and the text moves."""

import pandas as pd

from mmlens.experiments.report.captions import (
    emergence_caption,
    flow_caption,
    lens_comparison_caption,
)
from mmlens.experiments.summary import flow_summary


def table(peak_layer: int, depth: float, flow: str = "question->last") -> pd.DataFrame:
    rows = []
    for task, shift in (("ChooseAttr", 0), ("QueryAttr", 3)):
        for example in range(4):
            for layer in range(8):
                distance = abs(layer - (peak_layer + shift))
                value = depth / (1 + distance**2) + (example - 1.5)
                rows.append({"example_id": f"{task}{example}", "task": task, "flow": flow,
                             "layer": layer, "rel_change": value})
    return pd.DataFrame(rows)


def test_the_flow_caption_names_the_peak_the_table_has():
    for peak, depth in ((1, -40.0), (4, -12.0)):
        summary = flow_summary(table(peak, depth), n_boot=200)
        text = flow_caption(summary, "question->last", window=3, n_layers=8)
        overall = summary[(summary.task == "all")].iloc[0]
        assert f"{overall.peak_change:+.1f}%" in text
        assert f"at centre layer {overall.peak_layer} " in text
        assert f"(blocking layers {max(0, overall.peak_layer - 1)}.." in text
        # the two tasks peak three layers apart, and the caption says where
        assert f"ChooseAttr at layer {peak}" in text and f"QueryAttr at layer {peak + 3}" in text
        assert "The paper reports:" in text


def test_a_flow_that_never_lowers_the_answer_is_described_so():
    summary = flow_summary(table(2, +20.0, flow="last->last"), n_boot=50)
    text = flow_caption(summary, "last->last", window=3, n_layers=8)
    assert "never lowers" in text and "largest mean drop" not in text


def test_the_emergence_caption_follows_which_form_leads():
    rows = []
    for layer in range(6):
        lower = [0.0, 0.1, 0.5, 0.6, 0.2, 0.1][layer]
        capital = [0.0, 0.0, 0.1, 0.3, 0.7, 0.9][layer]
        for variant, prob in (("lower", lower), ("capitalised", capital)):
            rows.append({"example_id": "a", "layer": layer, "variant": variant, "prob": prob})
    text = emergence_caption(pd.DataFrame(rows))
    assert "answer, lowercase peaks at layer 3 (mean p 0.60)" in text
    assert "answer, capitalised peaks at layer 5" in text
    assert "leads from layer 1 until layer 4" in text


def test_a_curve_with_two_equal_peaks_is_captioned_with_both():
    rows = []
    for layer in range(8):
        lower = [0.0, 0.4, 0.2, 0.1, 0.4, 0.4, 0.1, 0.0][layer]  # peaks at 1 and 4..5
        capital = [0.0, 0.1, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1][layer]
        for variant, prob in (("lower", lower), ("capitalised", capital)):
            rows.append({"example_id": "a", "layer": layer, "variant": variant, "prob": prob})
    text = emergence_caption(pd.DataFrame(rows))
    assert "answer, lowercase peaks at layers 1 and 4 (mean p 0.40 each)" in text
    assert "answer, capitalised peaks at layer 2 (mean p 0.30)" in text


def test_of_two_equal_drops_the_flow_caption_names_the_earlier_as_documented():
    rows = []
    for example, offset in (("a", 1.0), ("b", -1.0)):
        for layer, value in enumerate([0, -30, -10, 0, -10, -30, 0]):
            rows.append({"example_id": example, "task": "T", "flow": "question->last",
                         "layer": layer, "rel_change": value + offset})
    summary = flow_summary(pd.DataFrame(rows), n_boot=50)
    text = flow_caption(summary, "question->last", window=1, n_layers=7)
    assert "-30.0% (95% CI" in text and "at centre layer 1 (blocking layers 1..1)" in text


def test_the_tuned_lens_caption_reads_both_curves():
    rows = pd.DataFrame([(e, layer, reading, p) for e in ("a", "b")
                         for reading, curve in (("final_norm", [0.1, 0.5, 0.9]),
                                                ("tuned", [0.4, 0.7, 0.9]))
                         for layer, p in enumerate(curve)],
                        columns=["example_id", "layer", "reading", "prob"])
    text = lens_comparison_caption(rows, "answer, capitalised")
    assert text == ("The probability at the last position of the answer, capitalised (the form "
                    "the model gives): through the logit lens it peaks at layer 2 (mean p 0.9); "
                    "through the tuned lens it peaks at layer 2 (mean p 0.9). The readings differ "
                    "most at layer 0 (tuned 0.4 vs logit lens 0.1). Mean over 2 examples.")
