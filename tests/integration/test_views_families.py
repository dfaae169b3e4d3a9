"""Example views beyond LLaVA-1.5's square grid: Qwen-VL's rectangular grid of merged cells on
the resized image, the anyres base tile, and old views that hold a square ``grid``."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageColor
from tiny_qwen import FAMILIES, MERGE, PATCH, tiny_qwen, tiny_qwen_processor

from mmlens import HookedMultimodalTransformer
from mmlens.data.example import Example
from mmlens.experiments.report.views import example_view
from mmlens.inputs.qwen_geometry import unpack_patches
from mmlens.plotting.views import example_view_figure, view_caption

QUESTION = "What color is the circle?"
CELL = PATCH * MERGE  # px of the resized image one Qwen image token covers (28 when released)


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png(view) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(view["image_png"]))))


def _outlined_cells(figure, step_x: float, step_y: float) -> set[tuple[int, int]]:
    """(row, col) of each outlined cell, checking that it spans exactly one cell."""
    cells = set()
    for shape in figure.layout.shapes:
        assert shape.line.color in ("black", "white")
        assert (shape.x1 - shape.x0, shape.y1 - shape.y0) == pytest.approx((step_x, step_y))
        cells.add((round(shape.y0 / step_y), round(shape.x0 / step_x)))
    return cells


@pytest.mark.parametrize("family", FAMILIES)
def test_a_qwen_view_is_the_resized_image_under_its_grid_of_merged_cells(family):
    hf = tiny_qwen(family)
    model = HookedMultimodalTransformer.from_hf_model(hf, processor=tiny_qwen_processor())
    width, height, box = 60, 36, (10.0, 5.0, 12.0, 9.0)
    image = _noise(width, height)
    example = Example(example_id="q1", question=QUESTION, answer="red", task="ChooseAttr",
                      image_id="i1", boxes=[box], image=image)
    view = example_view(model, example, {}, "blue")

    batch = model.prepare(image, QUESTION, boxes=[[box]])
    _, grid_h, grid_w = batch.image_sizes[0].tolist()
    resized_w, resized_h = grid_w * PATCH, grid_h * PATCH
    rows, cols = resized_h // CELL, resized_w // CELL
    assert (rows, cols) == (4, 8)  # non-square, aspect kept by the processor
    image_positions = batch.positions("image", 0)
    assert (view["rows"], view["cols"]) == (rows, cols)
    assert view["rows"] * view["cols"] == len(image_positions) == len(view["attention"])
    assert view["cell_px"] == CELL

    # Related cells: the box scaled to the resized image, half-open overlap with each cell.
    x0, y0 = box[0] * resized_w / width, box[1] * resized_h / height
    x1, y1 = (box[0] + box[2]) * resized_w / width, (box[1] + box[3]) * resized_h / height
    expected = [r * cols + c for r in range(rows) for c in range(cols)
                if c * CELL < x1 and (c + 1) * CELL > x0 and r * CELL < y1 and (r + 1) * CELL > y0]
    assert view["related"] == expected == [1, 2, 9, 10]

    # Attention: Hugging Face's eager patterns, question rows, image-token columns.
    hf.set_attn_implementation("eager")
    n_patches = grid_h * grid_w
    with torch.no_grad():
        out = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 pixel_values=batch.pixel_values[0, :n_patches], image_grid_thw=batch.image_sizes,
                 mm_token_type_ids=(batch.input_ids == model.cfg.image_token_id).int(),
                 output_attentions=True)
    question = batch.positions("question", 0)
    reference = torch.stack([pattern[0][:, question][:, :, image_positions].mean((0, 1))
                             for pattern in out.attentions]).mean(0)
    assert len(out.attentions) == model.cfg.n_layers
    assert torch.allclose(torch.tensor(view["attention"]), reference, atol=1e-5)

    # The image: the processor's bicubic resize of the original, to 1/255.
    resized = np.asarray(image.resize((resized_w, resized_h), Image.BICUBIC)).astype(int)
    pixels = _png(view).astype(int)
    assert pixels.shape == (resized_h, resized_w, 3)
    assert np.abs(pixels - resized).max() <= 1

    figure = example_view_figure(view)
    assert _outlined_cells(figure, CELL, CELL) == {divmod(i, cols) for i in expected}
    heatmap = next(trace for trace in figure.data if trace.type == "heatmap")
    assert np.asarray(heatmap.z).shape == (rows, cols)

    attention = np.asarray(view["attention"])
    share = attention[expected].sum() / attention.sum()
    caption = view_caption(view)
    assert f"the {len(expected)} related patches of {rows * cols}" in caption
    assert f"({rows}x{cols} cells of {CELL} px)" in caption
    assert f"draw {share:.0%}" in caption and f"against {len(expected) / (rows * cols):.0%}" \
        in caption


def test_unpacking_inverts_the_processors_patch_packing():
    processor = tiny_qwen_processor()
    image = _noise(48, 24, seed=2)  # already a multiple of the cell: no resize
    out = processor.image_processor(images=[image], do_resize=False, do_rescale=False,
                                    do_normalize=False, return_tensors="pt")
    _, grid_h, grid_w = out["image_grid_thw"][0].tolist()
    pixels = unpack_patches(out["pixel_values"], grid_h, grid_w, PATCH, MERGE, 2)
    assert torch.equal(pixels, torch.from_numpy(np.array(image)).permute(2, 0, 1).float())
    with pytest.raises(ValueError, match="does not split into 2x2 merge blocks"):
        unpack_patches(out["pixel_values"], grid_h - 1, grid_w, PATCH, MERGE, 2)


def _anyres(kind: str):
    if kind == "llava_next":
        import tiny_next as module

        hf = module.tiny_next()
        return module, HookedMultimodalTransformer.from_hf_model(
            hf, processor=module.tiny_processor())
    import tiny_onevision as module

    hf = module.tiny_onevision()
    return module, HookedMultimodalTransformer.from_hf_model(
        hf, processor=module.tiny_processor(hf.config))


@pytest.mark.parametrize("kind", ["llava_next", "llava_onevision"])
def test_an_anyres_view_is_the_base_tile(kind):
    """LLaVA-NeXT and OneVision show the base tile's grid; OneVision's SigLIP has no class
    token, so nothing is dropped before the base features."""
    from mmlens.inputs.anyres_spans import image_position_map

    module, model = _anyres(kind)
    image, box = module.random_image(40, 90), (5.0, 10.0, 30.0, 20.0)
    example = Example(example_id="a1", question=module.QUESTIONS[0], answer="red",
                      task="ChooseAttr", image_id="i1", boxes=[box], image=image)
    view = example_view(model, example, {}, None)

    batch = model.prepare(image, module.QUESTIONS[0], boxes=[[box]])
    places = image_position_map(image.size, model.cfg)
    base = batch.positions("image", 0)[[k for k, p in enumerate(places) if p.kind == "base"]]
    grid = model.cfg.vision.grid_size
    assert len(base) == grid**2 and (view["rows"], view["cols"]) == (grid, grid)
    related = torch.isin(base, batch.positions("related", 0)).nonzero().flatten().tolist()
    assert related and view["related"] == related
    _, cache = model.run_with_cache(batch, names_filter=lambda name: name.endswith("hook_pattern"))
    question = batch.positions("question", 0)
    reference = torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"][0][:, question][:, :, base]
                             .mean((0, 1)) for layer in range(model.cfg.n_layers)]).mean(0)
    assert torch.allclose(torch.tensor(view["attention"]), reference, atol=1e-6)
    side = model.cfg.vision.image_size
    assert _png(view).shape == (side, side, 3)


def _old_view(**changes):
    pixels = np.zeros((30, 30, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    view = {"example_id": "x", "task": "ChooseAttr", "question": QUESTION, "answer": "red",
            "model_answer": "red", "grid": 3, "image_png": base64.b64encode(
                buffer.getvalue()).decode(), "related": [1, 5],
            "attention": [0.1, 0.4, 0.0, 0.0, 0.0, 0.1, 0.0, 0.0, 0.2]}
    return view | changes


def test_an_old_view_with_a_square_grid_still_draws():
    view = _old_view()
    figure = example_view_figure(view)
    assert _outlined_cells(figure, 10, 10) == {(0, 1), (1, 2)}
    assert np.asarray(next(t for t in figure.data if t.type == "heatmap").z).shape == (3, 3)
    caption = view_caption(view)
    # 0.5 of 0.8 lands on the two related patches of nine
    assert "the 2 related patches of 9 (3x3 cells)" in caption
    assert "draw 62%" in caption and "against 22%" in caption


def test_a_damaged_view_is_refused_naming_its_task():
    with pytest.raises(ValueError, match="task 'ChooseAttr' holds 8 attention values for a 3x3"):
        example_view_figure(_old_view(attention=[0.1] * 8))
    with pytest.raises(ValueError, match="task 'ChooseAttr' has neither rows/cols nor grid"):
        view_caption({k: v for k, v in _old_view().items() if k != "grid"})
    with pytest.raises(ValueError, match="marks cell 12, outside its 3x4 grid"):
        view_caption(_old_view(rows=3, cols=4, related=[12], attention=[0.1] * 12))


def _luminance(colour: str) -> float:
    red, green, blue = ImageColor.getrgb(colour)
    return (0.2126 * red + 0.7152 * green + 0.0722 * blue) / 255


def test_outlines_show_on_shapes_of_any_colour_and_a_long_title_wraps():
    view = _old_view(question="Is the large square to the left or to the right of the small "
                              "yellow triangle near the top edge?")
    figure = example_view_figure(view)
    shapes = list(figure.layout.shapes)
    for cell in view["related"]:
        lines = [s.line for s in shapes if (round(s.y0 / 10), round(s.x0 / 10)) == divmod(cell, 3)]
        # a wide dark border drawn first, a narrower white line on top of it
        assert [line.color for line in lines] == ["black", "white"]
        assert lines[0].width > lines[1].width
    # on every colour a shape can have, one of the two lines stands out
    for colour in ("red", "green", "blue", "yellow", "white", "black", "gray", "orange"):
        contrast = max(abs(_luminance(line.line.color) - _luminance(colour)) for line in shapes)
        assert contrast >= 0.45, colour
    title = figure.layout.title.text
    lines = title.split("<br>")
    assert len(lines) > 1 and " ".join(lines) == (
        f"ChooseAttr: {view['question']} (gold 'red', model 'red')")
    # each line fits the figure (at a generous 9 px per character), and the top margin holds them
    assert max(len(line) for line in lines) * 9 <= figure.layout.width
    assert figure.layout.margin.t >= 24 * len(lines)
