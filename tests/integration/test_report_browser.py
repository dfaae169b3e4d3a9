"""The report's explorer in a real browser: headless Chromium (the system's package) driven
through chromedriver's W3C API loads report.html over file://, a click on a word lays its
causal map over the example, a click on a flow moves the map to that flow's window and draws
the example's curve for it; the map drawn equals causal_map computed here, the window is
centred at the example's deepest drop in flow.csv, and the curve equals flow.csv's rows and
flow_curve computed here."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import LlavaForConditionalGeneration
from webdriver import Browser, find_browser

from mmlens import HookedMultimodalTransformer
from mmlens.cli import main
from mmlens.data.shapes import generate_per_task
from mmlens.inputs.prepare import prepare
from mmlens.methods import causal_map, window_layers
from mmlens.methods.flow_curve import flow_curve
from mmlens.plotting.views import word_map_grid
from mmlens.zoo.build import build_config, build_processor

BROWSER = find_browser()
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="no chromium and chromedriver on PATH: install them "
    "(apt-get install -y chromium chromium-driver) to test the report in a browser")

PLOT_READY = "var d = document.getElementById(arguments[0]); return !!(d && d.data);"
STATE = """var d = document.getElementById(arguments[0]);
return {shown: d.dataset.shown || null, visible: d.data.slice(1).map(t => t.visible !== false),
        z: d.data[2].z, caption: document.querySelector('.map-caption').textContent};"""
CURVE = """var d = document.getElementById(arguments[0] + '-curve');
var v = document.getElementById(arguments[0]);
return {x: d.data[0].x, y: d.data[0].y, name: d.data[0].name, point: [d.data[1].x, d.data[1].y],
        flow: v.dataset.flow || null, z: v.data[2].z, shown: v.dataset.shown || null,
        caption: document.querySelector('.curve-caption').textContent};"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-task study of a small random model with the shapes-llava processor."""
    folder = tmp_path_factory.mktemp("model")
    processor = build_processor(56)
    config = build_config(len(processor.tokenizer), image_size=56, vision_layers=2,
                          text_layers=4, width=32)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    out = tmp_path_factory.mktemp("run")
    assert main(["flow", "--model", str(folder), "--per-task", "1", "--no-filter", "--quiet",
                 "--tasks", "QueryAttr", "--out", str(out)]) == 0
    return folder, out


def expected_map(model, view, record, entry) -> np.ndarray:
    """causal_map for the entry's positions (or the last position) over the view's grid."""
    image = record.load_image()
    batch = prepare(model, [image], [record.question], boxes=[record.boxes_for(image.size)])
    dst = "last" if entry["span"] == "last" else [entry["positions"]]
    frame = causal_map(model, batch, dst=dst, layers=entry["layers"], images=[image])
    grid = frame[frame["tile"] == 0].sort_values(["row", "col"])
    return grid["value"].to_numpy().reshape(view["rows"], view["cols"])


def test_clicking_a_word_shows_its_causal_map(run):
    folder, out = run
    view = json.loads((out / "views.json").read_text())[0]
    entries = view["word_maps"]
    question_word = next(i for i, e in enumerate(entries) if e["word"] == "side")
    last = sum(e["window"] == 0 for e in entries) - 1
    assert entries[last]["span"] == "last"
    model = HookedMultimodalTransformer.from_pretrained(str(folder))
    record = next(e for e in generate_per_task(1, seed=0, tasks=["QueryAttr"])
                  if str(e.example_id) == view["example_id"])
    with Browser(*BROWSER) as browser:
        browser.open((out / "report.html").as_uri())
        for _ in range(100):
            if browser.run(PLOT_READY, "view-0"):
                break
        before = browser.run(STATE, "view-0")
        assert before["shown"] is None and before["visible"] == [True, False]
        states = {}
        for index in (question_word, last):
            browser.click(f".words[data-plot='view-0'] .word[data-index='{index}']")
            states[index] = browser.run(STATE, "view-0")
        browser.click(".words[data-plot='view-0'] .word[data-index='-1']")
        back = browser.run(STATE, "view-0")
    for index, state in states.items():
        assert state["shown"] == str(index) and state["visible"] == [False, True]
        assert entries[index]["word"] in state["caption"]
        drawn = np.asarray(state["z"], dtype=float)
        np.testing.assert_allclose(drawn, expected_map(model, view, record, entries[index]),
                                   atol=2e-6)
    # The picture moved: the last position's map is not the one the hidden trace held before
    # the first click (the first word's, drawn by plotly from views.json).
    assert not np.allclose(states[last]["z"], word_map_grid(view, 0))
    assert back["shown"] == "-1" and back["visible"] == [True, False]


def record_and_model(folder, view):
    model = HookedMultimodalTransformer.from_pretrained(str(folder))
    record = next(e for e in generate_per_task(1, seed=0, tasks=["QueryAttr"])
                  if str(e.example_id) == view["example_id"])
    return model, record


def test_picking_a_flow_moves_the_map_to_its_window_and_draws_its_curve(run):
    folder, out = run
    view = json.loads((out / "views.json").read_text())[0]
    flows, entries = view["flows"], view["word_maps"]
    n_words = sum(e["window"] == 0 for e in entries)
    word = next(i for i in range(n_words) if entries[i]["word"] == "side")
    # a flow whose window differs from the first flow's (the one shown before any click)
    pick = next(i for i, f in enumerate(flows) if f["layers"] != flows[0]["layers"])
    table = pd.read_csv(out / "flow.csv")
    window = json.loads((out / "run.json").read_text())["window"]
    model, record = record_and_model(folder, view)
    image = record.load_image()
    batch = prepare(model, [image], [record.question], boxes=[record.boxes_for(image.size)])
    with Browser(*BROWSER) as browser:
        browser.open((out / "report.html").as_uri())
        for _ in range(100):
            if browser.run(PLOT_READY, "view-0-curve"):
                break
        before = browser.run(CURVE, "view-0")
        browser.click(f".words[data-plot='view-0'] .word[data-index='{word}']")
        first = browser.run(CURVE, "view-0")
        browser.click(f".words[data-plot='view-0'] .flow[data-flow='{pick}']")
        after = browser.run(CURVE, "view-0")
    states = {0: (before, first), pick: (after, after)}
    for index, (curve_state, map_state) in states.items():
        name = flows[index]["name"]
        rows = table[(table["flow"] == name) & (table["example_id"].astype(str)
                                                == view["example_id"])].sort_values("layer")
        # the curve drawn is the example's rows of flow.csv, and flow_curve computed here
        assert curve_state["name"] == name
        np.testing.assert_allclose(curve_state["y"], rows["rel_change"], atol=1e-6)
        assert curve_state["x"] == rows["layer"].tolist()
        fresh = flow_curve(model, batch, name, window=window)
        np.testing.assert_allclose(curve_state["y"], fresh["rel_change"], atol=1e-4)
        # its window: centred at the deepest drop, marked on the curve, the map's layers
        centre = int(rows.loc[rows["rel_change"].idxmin(), "layer"])
        layers = window_layers(centre, window, 4)
        assert curve_state["point"][0] == [centre]
        np.testing.assert_allclose(curve_state["point"][1], [rows["rel_change"].min()],
                                   atol=1e-6)
        assert flows[index]["layers"] == layers and name in curve_state["caption"]
        entry = {**entries[word], "layers": layers}
        np.testing.assert_allclose(np.asarray(map_state["z"], dtype=float),
                                   expected_map(model, view, record, entry), atol=2e-6)
    assert after["flow"] == flows[pick]["name"] and after["shown"] == str(word)
    assert not np.allclose(np.asarray(first["z"], dtype=float), np.asarray(after["z"], float))
    assert before["y"] != after["y"]
