"""The report's explorer data: the maps of every window in window order, each flow pointing at
its window with its curve, strict JSON (a map with no value, NaN, is written as null, so the
browser's JSON.parse reads it), views saved before flows still get their words, and a run
without word maps says so."""

import json
import math
import re

import pytest

from mmlens.experiments.report.word_picker import NOT_COMPUTED, word_picker


def strict(text: str):
    def refuse(name):
        raise AssertionError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def payload(page: str, div_id: str = "view-0"):
    found = re.search(rf"<script type='application/json' id='{div_id}-maps'>(.*?)</script>",
                      page, re.DOTALL)
    return strict(found.group(1).replace("<\\/", "</"))


def entry(word, values, layers, window):
    return {"word": word, "positions": [3], "values": values, "p_base": 0.5, "span": "question",
            "layers": layers, "window": window}


VIEW = {"task": "T", "rows": 1, "cols": 2, "attention": [0.5, 0.5], "related": [],
        "flow_value": "rel_change",
        "flows": [{"name": "image->last", "layers": [2, 3], "window": 0, "centre": 2,
                   "centres": [0, 1, 2, 3], "values": [0.0, -1.0, -5.0, 0.5]},
                  {"name": "image->question", "layers": [0, 1], "window": 1, "centre": 0,
                   "centres": [0, 1, 2, 3], "values": [-9.0, -2.0, 0.0, 0.0]}],
        "word_maps": [entry("red", [-0.1, 0.2], [2, 3], 0),
                      entry("last position", [float("nan"), -0.3], [2, 3], 0),
                      entry("red", [-0.4, 0.0], [0, 1], 1),
                      entry("last position", [0.1, 0.1], [0, 1], 1)]}


def test_flows_point_at_their_windows_maps():
    page = word_picker(VIEW, "view-0")
    data = payload(page)
    assert data["words"] == 2 and len(data["maps"]) == 4
    assert data["maps"][1]["z"] == [[None, -0.3]]  # NaN as null: strict JSON
    assert [f["window"] for f in data["flows"]] == [0, 1]
    second = data["flows"][1]
    assert second["values"] == [-9.0, -2.0, 0.0, 0.0] and second["point"] == -9.0
    assert "layers 0-1" in second["caption"] and "-9.00%" in second["caption"]
    assert data["maps"][2 * 1 + 0]["z"] == [[-0.4, 0.0]]  # window 1's first word
    assert "layers 0-1" in data["maps"][2]["caption"]
    assert page.count("class='flow'") == 2 and page.count("class='word'") == 3
    assert "id=\"view-0-curve\"" in page


def test_views_saved_before_flows_keep_their_words():
    legacy = {key: value for key, value in VIEW.items() if key not in ("flows", "flow_value")}
    legacy["word_maps"] = [{k: v for k, v in e.items() if k != "window"}
                           for e in VIEW["word_maps"][:2]]
    page = word_picker(legacy, "view-3")
    data = payload(page, "view-3")
    assert data["words"] == 2 and data["flows"] == [] and "class='flow'" not in page
    assert "view-3-curve" not in page


def test_a_run_without_word_maps_says_so():
    skipped = {**VIEW, "word_maps_skipped": True}
    del skipped["word_maps"]
    page = word_picker(skipped, "view-1")
    assert NOT_COMPUTED.replace("'", "&#x27;") in page and "class='word'" not in page
    assert payload(page, "view-1")["maps"] == [] and page.count("class='flow'") == 2
    assert word_picker({"rows": 1, "cols": 2, "attention": [1, 0],
                        "related": []}, "view-2") == ""


@pytest.mark.parametrize("values", [[float("nan")] * 4, [0.0, 0.0, 0.0, 0.0]])
def test_maps_with_no_drop_still_get_a_colour_bound(values):
    view = {**VIEW, "word_maps": [entry("red", values[:2], [2, 3], 0),
                                  entry("last position", values[2:], [2, 3], 0)],
            "flows": VIEW["flows"][:1]}
    bounds = [m["bound"] for m in payload(word_picker(view, "view-0"))["maps"]]
    assert bounds == [1.0, 1.0] and not any(math.isnan(b) for b in bounds)
