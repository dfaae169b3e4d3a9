"""The notebook explorer: one button per example and word (and flow), one slider step per layer
window, and every map it carries equal to causal_map computed on the whole batch; with flows,
every curve equal to the study's sweep (information_flow) for that example, its first window
at the flow's deepest drop; words grouped from word-start pieces; bad choices refused."""

from __future__ import annotations

import numpy as np
import pytest
from tiny import small_shapes_model

from mmlens.core.errors import MMLensError
from mmlens.data.shapes import generate_per_task
from mmlens.experiments.sweep import information_flow
from mmlens.inputs.prepare import prepare_examples
from mmlens.methods import causal_map, window_layers
from mmlens.methods.word_maps import span_words
from mmlens.plotting import explore
from mmlens.plotting.explore import map_grid


@pytest.fixture(scope="module")
def small():
    model = small_shapes_model()
    examples = generate_per_task(1, seed=1, tasks=["ChooseAttr", "QueryAttr"])
    return model, prepare_examples(model, examples)


def test_every_map_in_the_explorer_equals_causal_map(small):
    model, batch = small
    figure = explore(model, batch, words=["the", "?"], centres=[0, 2], window=3)
    buttons = figure.layout.updatemenus[0].buttons
    labels = [button.label for button in buttons]
    assert labels == ["example 0: the", "example 0: ?", "example 0: last position",
                      "example 1: the", "example 1: ?", "example 1: last position"]
    windows = [window_layers(0, 3, 4), window_layers(2, 3, 4)]
    question = [span_words(model, batch, example=i) for i in range(2)]
    for button in buttons:
        example, word = button.label.removeprefix("example ").split(": ")
        example = int(example)
        if word == "last position":
            dst = [batch.positions("last", i) for i in range(2)]
        else:
            dst = [next(p for w, p in question[i] if w == word) for i in range(2)]
        slider = button.args[1]["sliders"][0]
        assert [step["label"] for step in slider["steps"]] == ["0-1", "1-3"]
        for step, layers in zip(slider["steps"], windows, strict=True):
            frame = causal_map(model, batch, dst=dst, layers=layers)
            expected = map_grid(frame[frame["example"] == example])
            np.testing.assert_allclose(np.asarray(step["args"][0]["z"][0], dtype=float),
                                       np.asarray(expected["z"], dtype=float), atol=1e-6)
            assert f"layers {layers[0]}-{layers[-1]}" in step["args"][1]["title"]
        # the button draws its first window's map and its example's image
        assert button.args[0]["z"][1] == slider["steps"][0]["args"][0]["z"][0]
        image = np.asarray(batch.examples[example].load_image())[..., :3]
        assert np.array_equal(np.asarray(button.args[0]["z"][0]), image)
    # the grid's 4x4 cells sit at the centres of the image's quarters
    first = figure.data[1]
    size = batch.examples[0].load_image().size
    np.testing.assert_allclose(first.x, (np.arange(4) + 0.5) * size[0] / 4)
    np.testing.assert_allclose(first.y, (np.arange(4) + 0.5) * size[1] / 4)


def test_words_run_from_one_word_start_piece_to_the_next(small, monkeypatch):
    model, batch = small
    question = batch.positions("question", 0)
    assert [p.tolist() for _, p in span_words(model, batch)] == [[p] for p in question.tolist()]
    # A tokenizer marking word starts (GPT-2's "Ġ"): the third piece continues the second word.
    real = model.tokenizer.convert_ids_to_tokens
    monkeypatch.setattr(model.tokenizer, "convert_ids_to_tokens", lambda ids: [
        piece if index == 2 else "Ġ" + piece for index, piece in enumerate(real(ids))])
    words = span_words(model, batch)
    assert [p.tolist() for _, p in words] == ([[question[0].item()], question[1:3].tolist()]
                                              + [[p] for p in question[3:].tolist()])
    assert words[1][0] == model.tokenizer.decode(batch.input_ids[0, question[1:3]]).strip()


def test_bad_choices_are_refused(small):
    model, batch = small
    with pytest.raises(MMLensError, match="none of the words"):
        explore(model, batch, words=["zebra"], centres=[0], window=1)
    with pytest.raises(ValueError, match="outside the model's layers"):
        explore(model, batch, words=["the"], centres=[9], window=1)


FLOWS = ["image->last", "image->question"]


def test_flows_draw_the_sweeps_curve_and_start_at_its_deepest_window(small):
    model, batch = small
    figure = explore(model, batch, words=["the"], centres=[0], window=1, flows=FLOWS)
    sweep = information_flow(model, batch, flows=FLOWS, window=1, only_correct=False,
                             progress=False, preset="none")
    buttons = figure.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == [f"example {e}: {w} | {f}" for e in (0, 1)
                                          for w in ("the", "last position") for f in FLOWS]
    question = [span_words(model, batch, example=i) for i in range(2)]
    starts = set()
    for button in buttons:
        head, flow = button.label.split(" | ")
        example, word = head.removeprefix("example ").split(": ")
        example = int(example)
        rows = sweep[(sweep["flow"] == flow) & (sweep["example_id"] == str(
            batch.examples[example].example_id))].sort_values("layer")
        # the curve is the sweep's, for this example and flow
        np.testing.assert_allclose(button.args[0]["y"][2], rows["rel_change"], atol=1e-4)
        assert list(button.args[0]["x"][2]) == rows["layer"].tolist()
        deepest = int(rows.loc[rows["rel_change"].idxmin(), "layer"])
        slider = button.args[1]["sliders"][0]
        labels = [step["label"] for step in slider["steps"]]
        assert labels == [f"{c}-{c}" for c in sorted({0, *_deepest_of(sweep, batch, example)})]
        assert labels[slider["active"]] == f"{deepest}-{deepest}"
        starts.add(deepest)
        if word == "last position":
            dst = [batch.positions("last", i) for i in range(2)]
        else:
            dst = [next(p for w, p in question[i] if w == word) for i in range(2)]
        for step in slider["steps"]:
            layers = [int(step["label"].split("-")[0])]
            frame = causal_map(model, batch, dst=dst, layers=layers)
            expected = map_grid(frame[frame["example"] == example])
            np.testing.assert_allclose(np.asarray(step["args"][0]["z"][0], dtype=float),
                                       np.asarray(expected["z"], dtype=float), atol=1e-6)
            # the mark sits on the curve at the window's centre
            assert step["args"][0]["x"][1] == layers
            np.testing.assert_allclose(step["args"][0]["y"][1], rows.set_index("layer").loc[
                layers, "rel_change"], atol=1e-4)
        # the button opens at the flow's deepest window
        assert button.args[0]["z"][1] == slider["steps"][slider["active"]]["args"][0]["z"][0]
    assert len(starts) > 1  # the flows pick different windows on this model


def _deepest_of(sweep, batch, example):
    rows = sweep[sweep["example_id"] == str(batch.examples[example].example_id)]
    return {int(g.loc[g["rel_change"].idxmin(), "layer"]) for _, g in rows.groupby("flow")}


def test_bad_flows_are_refused(small):
    model, batch = small
    with pytest.raises(MMLensError, match="flows is empty"):
        explore(model, batch, words=["the"], centres=[0], window=1, flows=[])
    with pytest.raises(MMLensError, match="not 'SOURCE->TARGET'"):
        explore(model, batch, words=["the"], centres=[0], window=1, flows=["image-last"])
    with pytest.raises(KeyError, match="unknown span 'picture'"):
        explore(model, batch, words=["the"], centres=[0], window=1, flows=["picture->last"])
