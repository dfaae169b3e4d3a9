"""Word maps batched across words and windows: every word's map in every window, from one clean
run, equals one ``causal_map`` per word and window, on the bundled LLaVA-1.5 and a tiny Gemma 3
(its image tokens see each other: a group whose dst lies in the image resumes at the block's
start), whether the variants of several windows share a forward or not; bad grids and windows
are refused."""

import pytest
import torch
from PIL import Image

from mmlens import HookedMultimodalTransformer
from mmlens.core.errors import MMLensError
from mmlens.data.shapes import generate_per_task
from mmlens.inputs.prepare import prepare_examples
from mmlens.methods import causal_map
from mmlens.methods.causal_map import blocked_probs
from mmlens.methods.clean_run import clean_run
from mmlens.methods.word_maps import span_words, window_word_maps, word_maps
from mmlens.zoo.tiny import tiny_hf_model, tiny_processor

SIZE = (37, 29)  # the Gemma 3 image's, for causal_map's pixel boxes


@pytest.fixture(scope="module")
def shapes():
    model = HookedMultimodalTransformer.from_pretrained("shapes-llava").eval()
    batch = prepare_examples(model, generate_per_task(1, seed=7, tasks=["ChooseAttr"]))
    return model, batch


@pytest.fixture(scope="module")
def gemma():
    hf = tiny_hf_model("gemma3")
    model = HookedMultimodalTransformer.from_hf_model(hf, tiny_processor("gemma3", hf.config))
    batch = model.prepare([Image.new("RGB", SIZE, "red")], ["What color is the square?"])
    return model.eval(), batch


def _per_word(model, batch, grid, dst, layers):
    """The map of one word in one window as before: causal_map, one region per grid token."""
    return causal_map(model, batch, dst=[dst], layers=layers, images=[SIZE],
                      regions={str(i): [grid[i:i + 1]] for i in range(len(grid))})


def _check_maps(model, batch, grid, windows, batch_size, moves):
    per_window = window_word_maps(model, batch, windows, grid=grid, spans=("question", "last"),
                                  batch_size=batch_size)
    words = span_words(model, batch) + span_words(model, batch, "last")
    assert len(per_window) == len(windows)
    worst, moved = 0.0, 0.0
    for layers, entries in zip(windows, per_window, strict=True):
        assert [(e["word"], e["positions"]) for e in entries] == [
            (w, p.tolist()) for w, p in words]
        assert [e["span"] for e in entries][-1] == "last"
        for entry, (_, positions) in zip(entries, words, strict=True):
            frame = _per_word(model, batch, grid, positions, layers)
            old = torch.tensor(frame["value"].to_numpy())
            new = torch.tensor(entry["values"], dtype=torch.float64)
            worst = max(worst, float((new - old).abs().max()))
            moved = max(moved, float(old.abs().max()))
            assert entry["p_base"] == pytest.approx(float(frame["p_base"].iloc[0]), abs=1e-7)
    assert worst <= 1e-6  # values are rounded to 6 decimals: 5e-7 of it is the rounding
    assert moved > moves  # the blocks do something (one token moves the toy model's p ~1e-5)
    return per_window


@pytest.mark.parametrize("batch_size", [16, 1024])
def test_llava_word_maps_in_several_windows_equal_causal_map(shapes, batch_size):
    model, batch = shapes
    grid = batch.positions("image", 0)[::5]  # 13 of the 64 tokens keep the test quick
    windows = [[2, 3, 4], [0, 1, 2], [5, 6, 7]]
    per_window = _check_maps(model, batch, grid, windows, batch_size, 5e-6)
    # one window and one span: word_maps is the same computation
    assert word_maps(model, batch, windows[1], grid=grid) == [
        {k: v for k, v in e.items() if k != "span"} for e in per_window[1][:-1]]


def test_gemma3_word_maps_equal_causal_map(gemma):
    model, batch = gemma
    _check_maps(model, batch, batch.positions("image", 0), [[0, 1], [1, 2, 3], [3, 4]], 24,
                1e-3)


def test_groups_inside_a_bidirectional_image_block_equal_causal_map(gemma):
    """Groups whose dst is image tokens (the engine resumes at the image's first token) beside
    a question word's, windows starting at different layers, in one batch and in small ones."""
    model, batch = gemma
    image = batch.positions("image", 0)
    word = batch.positions("question", 0)[1:2]
    regions = [image[i:i + 1] for i in (0, 3, 9, 15)]
    groups = [(word, [1, 2]), (image[4:8], [0, 1, 2]), (image[10:], [2, 3]),
              (image[:1], [3, 4])]
    clean = clean_run(model, batch)
    token = clean.prediction()
    for batch_size in (3, 64):
        probs = blocked_probs(model, clean, regions, groups, token, batch_size)
        for row, (dst, layers) in enumerate(groups):
            frame = causal_map(model, batch, dst=[dst], layers=layers, images=[SIZE],
                               regions={str(i): [r] for i, r in enumerate(regions)})
            expected = torch.tensor(frame["p_block"].to_numpy(), dtype=probs.dtype)
            assert (probs[row] - expected).abs().max() / clean.prob(token) <= 1e-6
        # the image blocks matter: up to 3e-3 of p(token)
        assert (probs[1:] - clean.prob(token)).abs().max() / clean.prob(token) > 1e-3


def test_bad_grids_and_windows_are_refused(shapes):
    model, batch = shapes
    question = batch.positions("question", 0)
    with pytest.raises(MMLensError, match="not an image token"):
        window_word_maps(model, batch, [[1]], grid=question[:2])
    with pytest.raises(MMLensError, match="each window needs layers"):
        window_word_maps(model, batch, [[1], []])
    with pytest.raises(MMLensError, match="each window needs layers"):
        window_word_maps(model, batch, [])
    with pytest.raises(ValueError, match="outside the language tower"):
        window_word_maps(model, batch, [[model.cfg.n_layers]])
    with pytest.raises(MMLensError, match="the grid is empty"):
        window_word_maps(model, batch, [[1]], grid=question[:0])
    with pytest.raises(MMLensError, match="batch_size must be at least 1"):
        window_word_maps(model, batch, [[1]], batch_size=0)
