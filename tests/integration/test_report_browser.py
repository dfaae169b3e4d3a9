"""The report's word picker in a real browser: headless Chromium (the system's package) driven
through chromedriver's W3C API loads report.html over file://, a click on a word lays its
causal map over the example, and the map drawn equals causal_map computed here."""

import json

import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration
from webdriver import Browser, find_browser

from mmlens import HookedMultimodalTransformer
from mmlens.cli import main
from mmlens.data.shapes import generate_per_task
from mmlens.inputs.prepare import prepare
from mmlens.methods import causal_map
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
    last = len(entries) - 1
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
