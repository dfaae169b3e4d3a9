"""Figures build from tidy frames and caches, and carry the expected traces and numbers."""

import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from mmlens import MultimodalBatch
from mmlens.methods.patching import patching_frame
from mmlens.plotting import (
    attention_mass,
    attention_mass_heatmap,
    image_attention,
    knockout_curves,
    layer_span_heatmap,
    lens_trajectories,
    mean_with_band,
)

GRID = 2


@pytest.fixture()
def batch_and_cache():
    """Two examples of 8 positions: bos, 4 image patches (2x2), 2 question tokens, last."""
    spans = [{"image": torch.arange(1, 5), "question": torch.tensor([5, 6]),
              "last": torch.tensor([7])} for _ in range(2)]
    batch = MultimodalBatch(input_ids=torch.zeros(2, 8, dtype=torch.long),
                            attention_mask=torch.ones(2, 8, dtype=torch.long),
                            pixel_values=torch.zeros(2, 3, 4, 4), spans=spans)
    gen = torch.Generator().manual_seed(0)
    cache = {f"blocks.{layer}.attn.hook_pattern": torch.rand(2, 3, 8, 8, generator=gen).softmax(-1)
             for layer in range(2)}
    return batch, cache


def test_attention_mass_table(batch_and_cache):
    batch, cache = batch_and_cache
    frame = attention_mass(cache, batch, "image", "question")
    assert list(frame.columns) == ["example", "layer", "head", "src", "dst", "mass"]
    assert len(frame) == 2 * 2 * 3
    row = frame[(frame["example"] == 1) & (frame["layer"] == 1) & (frame["head"] == 2)]
    pattern = cache["blocks.1.attn.hook_pattern"][1, 2]
    expected = pattern[5:7, 1:5].sum(-1).mean()
    assert row["mass"].item() == pytest.approx(expected.item())
    assert set(frame["src"]) == {"image"} and set(frame["dst"]) == {"question"}
    figure = attention_mass_heatmap(frame)
    assert isinstance(figure, go.Figure) and figure.data[0].type == "heatmap"
    assert np.asarray(figure.data[0].z).shape == (2, 3)
    with pytest.raises(KeyError, match="the cache has no blocks.5.attn.hook_pattern"):
        attention_mass(cache, batch, "image", "last", layers=[5])


def test_image_attention_over_the_patch_grid(batch_and_cache):
    batch, cache = batch_and_cache
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    figure = image_attention(cache, batch, GRID, layer=1, example=1, head=0, image=image)
    assert [trace.type for trace in figure.data] == ["image", "heatmap"]
    heatmap = figure.data[1]
    expected = cache["blocks.1.attn.hook_pattern"][1, 0, 7, 1:5].reshape(GRID, GRID)
    assert np.allclose(np.asarray(heatmap.z), expected.numpy())
    assert heatmap.opacity == pytest.approx(0.6)
    assert list(heatmap.x) == [8.0, 24.0]
    alone = image_attention(cache, batch, GRID, layer=0)
    assert [trace.type for trace in alone.data] == ["heatmap"]
    mean = cache["blocks.0.attn.hook_pattern"][0, :, 7, 1:5].mean(0).reshape(GRID, GRID)
    assert np.allclose(np.asarray(alone.data[0].z), mean.numpy())
    with pytest.raises(ValueError, match="has 4 image positions but a 3x3 grid needs 9"):
        image_attention(cache, batch, 3, layer=0)


def _knockout_frame():
    rng = np.random.default_rng(0)
    rows = []
    for task in ("ChooseAttr", "QueryAttr"):
        for flow in ("image -> last", "question -> last"):
            for layer in range(4):
                for example in range(5):
                    rows.append((task, flow, layer, example, rng.normal(-10 * layer, 3)))
    return pd.DataFrame(rows, columns=["task", "flow", "layer", "example", "rel_change"])


def test_knockout_curves_one_panel_per_task_with_bands():
    frame = _knockout_frame()
    figure = knockout_curves(frame)
    lines = [trace for trace in figure.data if trace.mode == "lines"]
    bands = [trace for trace in figure.data if trace.fill == "toself"]
    assert len(lines) == len(bands) == 4
    assert [trace.name for trace in lines[:2]] == ["image -> last", "question -> last"]
    assert [trace.showlegend for trace in lines] == [True, True, False, False]
    rows = frame[(frame["task"] == "QueryAttr") & (frame["flow"] == "question -> last")]
    means = rows.groupby("layer")["rel_change"].mean().to_numpy()
    assert np.allclose(lines[3].y, means)
    half = 1.96 * rows.groupby("layer")["rel_change"].std().to_numpy() / np.sqrt(5)
    assert np.allclose(np.asarray(bands[3].y)[:4], means + half)
    single = knockout_curves(frame.drop(columns="task"))
    assert len([trace for trace in single.data if trace.mode == "lines"]) == 2
    with pytest.raises(ValueError, match="missing rel_change"):
        knockout_curves(frame.drop(columns="rel_change"))


def test_lens_trajectories():
    frame = pd.DataFrame({"label": ["answer", "Answer"] * 6, "layer": np.repeat(range(3), 4),
                          "example": [0, 0, 1, 1] * 3, "prob": np.linspace(0, 1, 12),
                          "rank": np.arange(1, 13)})
    figure = lens_trajectories(frame)
    lines = [trace for trace in figure.data if trace.mode == "lines+markers"]
    assert [trace.name for trace in lines] == ["answer", "Answer"]
    assert np.allclose(lines[0].y, frame[frame["label"] == "answer"].groupby("layer")["prob"]
                       .mean())
    assert lens_trajectories(frame, value="rank").layout.yaxis.type == "log"
    with pytest.raises(ValueError, match="missing logit"):
        lens_trajectories(frame, value="logit")


def test_layer_span_heatmap_from_tensor_and_frame():
    scores = torch.tensor([[0.1, -0.5], [0.3, 0.9], [0.0, 0.2]])
    figure = layer_span_heatmap(scores, ["image", "question"], layers=[4, 5, 6])
    heatmap = figure.data[0]
    assert list(heatmap.x) == ["image", "question"] and list(heatmap.y) == [4, 5, 6]
    assert heatmap.zmid == 0 and heatmap.zmax == pytest.approx(0.9)
    frame = patching_frame(scores, ("layer", "span"),
                           labels={"layer": [4, 5, 6], "span": ["image", "question"]})
    from_frame = layer_span_heatmap(frame)
    assert np.allclose(np.asarray(from_frame.data[0].z), scores.numpy())
    with pytest.raises(ValueError, match=re.escape("scores are 3 x 2 but got 3 layers and 3")):
        layer_span_heatmap(scores, ["a", "b", "c"])


def test_mean_with_band_single_example_has_no_width():
    stats = mean_with_band(pd.DataFrame({"g": [1], "v": [2.0]}), ["g"], "v")
    assert stats[["mean", "low", "high"]].iloc[0].tolist() == [2.0, 2.0, 2.0]


def test_lens_trajectories_take_answer_emergence_columns():
    import pandas as pd

    from mmlens.plotting import lens_trajectories

    frame = pd.DataFrame({"variant": ["lower", "lower", "capitalised", "capitalised"],
                          "layer": [0, 1, 0, 1], "prob": [0.1, 0.5, 0.0, 0.2]})
    figure = lens_trajectories(frame)
    assert {trace.name for trace in figure.data if trace.name} >= {"lower", "capitalised"}


def test_knockout_curves_reject_an_empty_table():
    import pandas as pd
    import pytest

    from mmlens.plotting import knockout_curves

    with pytest.raises(ValueError, match="got no rows"):
        knockout_curves(pd.DataFrame(columns=["flow", "layer", "rel_change"]))
