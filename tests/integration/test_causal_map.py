"""Causal image maps: the batched map equals one full forward per region (block_attention +
run_with_hooks, or a residual patch), on the bundled LLaVA-1.5 and tiny Qwen2-VL, LLaVA-NeXT and
LLaVA-OneVision; the regions' grid places and pixel boxes; the figure; bad arguments refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image
from tiny_qwen import tiny_qwen, tiny_qwen_processor

from mmlens import HookedMultimodalTransformer
from mmlens.core.errors import MMLensError
from mmlens.data.shapes import generate_per_task
from mmlens.methods import block_attention, causal_map
from mmlens.methods.image_regions import grid_regions, image_token_cells


@pytest.fixture(scope="module")
def shapes():
    model = HookedMultimodalTransformer.from_pretrained("shapes-llava").eval()
    examples = generate_per_task(1, seed=7, tasks=["ChooseAttr", "QueryAttr"])
    from mmlens.inputs.prepare import prepare_examples

    return model, prepare_examples(model, examples)


@pytest.fixture(scope="module")
def qwen():
    model = HookedMultimodalTransformer.from_hf_model(
        tiny_qwen("qwen2_vl", text_layers=3), processor=tiny_qwen_processor()).eval()
    gen = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(24, 40, 3, generator=gen) * 255).byte().numpy())]
    batch = model.prepare(images, ["What color is the circle?"])
    return model, batch, images


def _naive(model, batch, frame, dst, layers, hooks_for=None):
    """One full forward per row of ``frame``: p(target) with that region blocked (or patched)."""
    probs = []
    for _, row in frame.iterrows():
        one = batch.select(int(row.example))
        offset = batch.input_ids.shape[1] - one.input_ids.shape[1]
        positions = [p - offset for p in row.position]
        with torch.no_grad():
            token = int(model(one)[0, -1].argmax())
            targets = dst if isinstance(dst, str) else [dst[int(row.example)] - offset]
            hooks = (block_attention([positions], targets, layers, batch=one) if hooks_for is None
                     else hooks_for(one, int(row.example), positions))
            logits = model.run_with_hooks(one, fwd_hooks=hooks)[0, -1].float()
        probs.append(float(logits.softmax(-1)[token]))
    return torch.tensor(probs, dtype=torch.float64)


def _check(frame, naive):
    fast = torch.tensor(frame.p_block.to_numpy())
    assert (fast - naive).abs().max() <= 1e-6
    values = (fast - torch.tensor(frame.p_base.to_numpy())) / torch.tensor(frame.p_base.to_numpy())
    assert torch.allclose(torch.tensor(frame.value.to_numpy()), values)
    assert (fast - torch.tensor(frame.p_base.to_numpy())).abs().max() > 1e-6  # it did something


@pytest.mark.parametrize("dst, cell, layers", [("last", 1, [2, 3, 4]), ("question", 3, [0, 1])])
def test_llava_map_equals_one_forward_per_region(shapes, dst, cell, layers):
    model, batch = shapes
    frame = causal_map(model, batch, dst, layers=layers, cell=cell, batch_size=16)
    n_regions = 64 if cell == 1 else 9  # 8x8 tokens; 3x3 blocks, edge blocks smaller
    assert len(frame) == len(batch) * n_regions
    assert sorted(len(p) for p in frame.position[frame.example == 0])[-1] == cell**2
    assert frame.groupby("example").position.sum().map(len).tolist() == [64, 64]
    checked = frame.iloc[::3] if cell == 1 else frame  # every third token keeps the test quick
    _check(checked, _naive(model, batch, checked, dst, layers))


def test_span_regions_and_a_word_as_dst(shapes):
    model, batch = shapes
    word = [q[:1] for q in batch.span("question")]
    frame = causal_map(model, batch, word, layers=[1, 2], regions=["related", "other"])
    assert frame.region.tolist() == ["related", "other"] * 2
    for _, row in frame.iterrows():
        span = batch.positions(row.region, int(row.example)).tolist()
        assert row.position == span
    _check(frame, _naive(model, batch, frame, word, [1, 2]))


def test_patch_map_equals_one_patched_forward_per_region(shapes):
    model, batch = shapes
    corrupted = dataclasses.replace(batch, pixel_values=batch.pixel_values.flip(0))
    layer = 2
    frame = causal_map(model, batch, layers=[layer], cell=2, mode="patch", corrupted=corrupted)

    def patch(one, example, positions):
        other = corrupted.select(example)
        with torch.no_grad():
            _, cache = model.run_with_cache(other, names_filter=f"blocks.{layer}.hook_resid_pre")
        source = cache[f"blocks.{layer}.hook_resid_pre"]

        def hook(resid, hook):
            resid = resid.clone()
            resid[:, positions] = source[:, positions]
            return resid

        return [(f"blocks.{layer}.hook_resid_pre", hook)]

    _check(frame, _naive(model, batch, frame, "last", [layer], patch))
    images = [e.load_image() for e in reversed(batch.examples)]  # the same swap, as images
    by_image = causal_map(model, batch, layers=[layer], cell=2, mode="patch", corrupted=images)
    assert (by_image.p_block - frame.p_block).abs().max() <= 1e-6


def test_qwen_map_equals_one_forward_per_region(qwen):
    model, batch, images = qwen
    frame = causal_map(model, batch, "last", layers=[1, 2], images=images)
    assert len(frame) == len(batch.positions("image", 0))
    _check(frame, _naive(model, batch, frame, "last", [1, 2]))


def test_qwen_cells_cover_the_original_image(qwen):
    model, batch, images = qwen
    cells = image_token_cells(model, batch, 0, images[0].size)
    rows, cols = max(c.row for c in cells) + 1, max(c.col for c in cells) + 1
    assert rows * cols == len(cells)
    width, height = images[0].size
    for c in cells:  # the resized image's cells, scaled back: an even partition
        assert c.box == pytest.approx((c.col * width / cols, c.row * height / rows,
                                       (c.col + 1) * width / cols, (c.row + 1) * height / rows))


def test_llava_pixel_boxes_undo_the_padding(shapes):
    model, _ = shapes
    image = Image.new("RGB", (150, 100), "white")
    batch = model.prepare([image], ["Is the circle red?"], preprocessing="pad")
    cells = image_token_cells(model, batch, 0, image.size, "pad")
    side = 150 / 8  # the padded square is 150 px, cut into 8x8 patches
    for c in cells:
        expected = (c.col * side, min(max(c.row * side - 25, 0), 100),
                    (c.col + 1) * side, min(max((c.row + 1) * side - 25, 0), 100))
        assert c.box == pytest.approx(expected)
    assert [c.position for c in cells] == batch.positions("image", 0).tolist()


def test_bad_arguments_are_refused(shapes):
    model, batch = shapes
    with pytest.raises(MMLensError, match="corrupted="):
        causal_map(model, batch, mode="patch")
    with pytest.raises(MMLensError, match="unknown mode"):
        causal_map(model, batch, mode="ablate")
    with pytest.raises(MMLensError, match="cell must be"):
        causal_map(model, batch, cell=0)
    with pytest.raises(MMLensError, match="holds no image token"):
        causal_map(model, batch, regions=["question"])
    with pytest.raises(MMLensError, match="pixel boxes need"):
        causal_map(model, dataclasses.replace(batch, examples=None))
    with pytest.raises(MMLensError, match="tokens differ"):
        causal_map(model, batch, mode="patch", corrupted=batch.select([1, 0]))
    with pytest.raises(ValueError, match="outside"):
        causal_map(model, batch, layers=[99])
    with pytest.raises(MMLensError, match="outside the vocabulary"):
        causal_map(model, batch, target=10**6)
    with pytest.raises(MMLensError, match="2 examples"):
        causal_map(model, batch, target=[3])


def test_figure_draws_each_region_at_its_box_beside_attention(shapes):
    from mmlens.plotting import causal_map_figure, region_attention

    model, batch = shapes
    layers = [1, 2]
    frame = causal_map(model, batch, layers=layers, cell=2)
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in layers]
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=names)
    attention = region_attention(cache, frame)
    row = frame.iloc[len(frame) - 3]  # an example-1 region: positions index the padded batch
    last = batch.positions("last", int(row.example))
    expected = sum(float(cache[name][int(row.example), :, last][..., row.position].sum(-1).mean())
                   for name in names) / len(names)
    assert attention.iloc[len(frame) - 3] == pytest.approx(expected, rel=1e-5)
    image = batch.examples[0].load_image()
    figure = causal_map_figure(frame, image, cache=cache)
    rows = frame[frame.example == 0]
    boxes = [(s.x0, s.y0, s.x1, s.y1) for s in figure.layout.shapes]
    assert boxes == [tuple(r) for r in rows[["x0", "y0", "x1", "y1"]].to_numpy()] * 2
    worst = rows.loc[rows.value.idxmin()]
    titles = [a.text for a in figure.layout.annotations]
    assert f"{worst.value:+.1%} at {worst.region}" in titles[0]
    assert "layers 1-2" in titles[0] and "attention from last" in titles[1]
    with pytest.raises(KeyError, match="hook_pattern"):
        region_attention({}, frame)


@pytest.fixture(scope="module", params=["llava_next", "onevision"])
def next_model(request):
    """LLaVA-NeXT (tiles), and LLaVA-OneVision whose anyres-max downscales the tile grid."""
    if request.param == "llava_next":
        from tiny_next import random_image, tiny_next, tiny_processor

        hf, processor = tiny_next(), tiny_processor()
    else:
        from tiny_onevision import random_image, tiny_onevision, tiny_processor

        hf = tiny_onevision()
        processor = tiny_processor(hf.config)
    model = HookedMultimodalTransformer.from_hf_model(hf, processor=processor).eval()
    images = [random_image(90, 40, seed=0), random_image(60, 150, seed=1)]  # (height, width)
    return model, model.prepare(images, ["What color is the square?", "Which shape is red?"]), \
        images


def test_next_cells_cover_the_image_on_both_grids(next_model):
    model, batch, images = next_model
    for i, image in enumerate(images):
        width, height = image.size
        cells = image_token_cells(model, batch, i, image.size)
        newline = batch.positions("image_newline", i).tolist()
        image_positions = batch.positions("image", i).tolist()
        assert [c.position for c in cells] == [p for p in image_positions if p not in newline]
        base, grid = [c for c in cells if c.tile == 0], model.cfg.vision.grid_size
        assert len(base) == grid**2  # the patches of the whole image squashed to one tile
        for c in base:
            assert c.box == pytest.approx((c.col * width / grid, c.row * height / grid,
                                           (c.col + 1) * width / grid,
                                           (c.row + 1) * height / grid))
        tiles = [c for c in cells if c.tile == 1]
        rows, cols = max(c.row for c in tiles) + 1, max(c.col for c in tiles) + 1
        assert rows == len(newline) and rows * cols == len(tiles)
        # the grid spans the image, up to the feature rows / columns the unpadding rounds off
        cell_w, cell_h = width / cols, height / rows
        assert all(0 <= c.box[0] <= c.box[2] <= width and 0 <= c.box[1] <= c.box[3] <= height
                   for c in tiles)
        x0, x1 = min(c.box[0] for c in tiles), max(c.box[2] for c in tiles)
        y0, y1 = min(c.box[1] for c in tiles), max(c.box[3] for c in tiles)
        assert x0 < cell_w and x1 > width - cell_w and y0 < cell_h and y1 > height - cell_h
        for c in tiles:  # row-major on the packed grid, boxes move right and down with it
            right = next((d for d in tiles if (d.row, d.col) == (c.row, c.col + 1)), None)
            if right is not None:
                assert right.box[0] >= c.box[0] and right.box[1] == c.box[1]


def test_next_map_equals_one_forward_per_region(next_model):
    model, batch, images = next_model
    frame = causal_map(model, batch, "last", layers=[0, 1], cell=2, images=images)
    assert set(frame.tile) == {0, 1}
    _check(frame, _naive(model, batch, frame, "last", [0, 1]))


def test_cells_follow_the_examples_image_token_map(shapes):
    """Cells are read off the example's image-token map (``batch.token_maps``), whatever the
    layout: a map whose grid is transposed moves every cell, and its regions, with it."""
    model, batch = shapes
    token_map = batch.token_maps[0][0]
    cells = image_token_cells(model, batch, 0, token_map.image_size)
    image = batch.positions("image", 0).tolist()
    assert [c.position for c in cells] == [
        image[k] for k, place in enumerate(token_map.grid_places()) if place is not None]
    assert [c.box for c in cells] == [token_map.pixel_box(image.index(c.position))
                                      for c in cells]
    transposed = dataclasses.replace(token_map, tokens=tuple(
        dataclasses.replace(t, row=t.col, col=t.row) for t in token_map.tokens))
    moved = dataclasses.replace(batch, token_maps=[[transposed], *batch.token_maps[1:]])
    moved_cells = image_token_cells(model, moved, 0, token_map.image_size)
    assert [(c.row, c.col) for c in moved_cells] == [(c.col, c.row) for c in cells]
    assert [c.box for c in moved_cells] == [c.box for c in cells]
    first = {r.label: set(r.positions.tolist()) for r in grid_regions(moved_cells, 2)}
    assert first["0:0,1"] == {c.position for c in cells if c.col < 2 and 2 <= c.row < 4}
