"""Qwen-VL through mmlens's study: prepare and its spans, knockout against HF eager attention
with an edited mask (M-RoPE included), and the fast sweep against the naive one."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_qwen import FAMILIES, IMAGE_TOKEN, MERGE, tiny_qwen, tiny_qwen_processor

from mmlens import HookedMultimodalTransformer
from mmlens.core.errors import MMLensError
from mmlens.experiments import DEFAULT_FLOWS, information_flow
from mmlens.experiments.presets import resolve_settings
from mmlens.methods import block_attention

TEXT_LAYERS = 4
QUESTIONS = ["What color is the circle?", "Is there a red square?", "Is the square left?"]
# (W, H): wide, tall and square, two of them resized by the processor.
SIZES = [(40, 24), (30, 70), (33, 33)]
BOXES = [[(8, 0, 8, 8)], [(0, 40, 12, 30)], [(3, 5, 10, 2), (20, 20, 5, 5)]]


def _images():
    images = []
    for (width, height), boxes in zip(SIZES, BOXES, strict=True):
        pixels = np.zeros((height, width, 3), dtype=np.uint8)
        for x, y, w, h in boxes:
            pixels[y:y + h, x:x + w] = 255
        images.append(Image.fromarray(pixels))
    return images


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    hf = tiny_qwen(request.param, text_layers=TEXT_LAYERS)
    hf.set_attn_implementation("eager")
    model = HookedMultimodalTransformer.from_hf_model(hf, processor=tiny_qwen_processor())
    batch = model.prepare(_images(), QUESTIONS, boxes=BOXES)
    return hf, model, batch


def _hf_logits(hf, batch):
    grid = batch.image_sizes
    pixels = torch.cat([p[:n] for p, n in zip(batch.pixel_values, grid.prod(-1), strict=True)])
    with torch.no_grad():
        return hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  pixel_values=pixels, image_grid_thw=grid,
                  mm_token_type_ids=(batch.input_ids == IMAGE_TOKEN).int()).logits


def test_prepare_gives_hf_inputs_and_exact_spans(setup):
    hf, model, batch = setup
    tokenizer = model.processor.tokenizer
    assert batch.image_sizes.shape == (3, 3)
    real = batch.attention_mask.bool()
    assert (_hf_logits(hf, batch) - model(batch))[real].abs().max() <= 1e-4
    for i, question in enumerate(QUESTIONS):
        words = tokenizer.convert_ids_to_tokens(batch.input_ids[i, batch.positions("question", i)])
        assert " ".join(words).replace(" ?", "?") == question
        _, grid_h, grid_w = batch.image_sizes[i].tolist()
        image = batch.positions("image", i)
        assert len(image) == grid_h * grid_w // MERGE**2
        assert bool((batch.input_ids[i, image] == IMAGE_TOKEN).all())
        assert batch.positions("last", i).tolist() == [batch.input_ids.shape[1] - 1]
        related, other = batch.positions("related", i), batch.positions("other", i)
        assert sorted([*related.tolist(), *other.tolist()]) == image.tolist()


def test_related_tokens_are_where_the_box_pixels_land(setup):
    # The first image (40x24 px) is not resized: its related tokens must be exactly the 8x8 px
    # cells holding lit pixels in the processor's own pixel_values.
    _, model, batch = setup
    grid = batch.image_sizes[0]
    patches = batch.pixel_values[0, :int(grid.prod())]
    std = torch.tensor(model.processor.image_processor.image_std)[:, None]
    mean = torch.tensor(model.processor.image_processor.image_mean)[:, None]
    lit = (patches.reshape(len(patches), 3, -1) * std + mean).mean((1, 2)) > 0.01
    tokens = lit.reshape(-1, MERGE**2).any(-1)
    image = batch.positions("image", 0)
    assert torch.equal(batch.positions("related", 0), image[tokens])


def test_select_keeps_each_examples_patches(setup):
    _, model, batch = setup
    with torch.no_grad():
        full = model(batch)
        one = batch.select(1)
        alone = model(one)
    keep = batch.attention_mask[1].bool()
    assert (alone[0] - full[1, keep]).abs().max() <= 1e-5


def _reference_hooks(layers, batch, src, dst, n_heads):
    def edit(module, args, kwargs):
        mask = kwargs["attention_mask"]
        minimum = torch.finfo(kwargs["hidden_states"].dtype).min
        n, q_len = kwargs["hidden_states"].shape[:2]
        mask = mask.expand(n, n_heads, q_len, q_len).clone()
        for i in range(n):
            rows, cols = batch.positions(dst, i), batch.positions(src, i)
            mask[i, :, rows[:, None], cols[None, :]] = minimum
        kwargs["attention_mask"] = mask
        return args, kwargs

    return edit


@pytest.mark.parametrize("src, dst, layers", [
    ("image", "last", [0, 1, 2, 3]),
    ("image", "question", [1, 2]),
    ("related", "question", [0]),
    ("question", "last", [2, 3]),
])
def test_knockout_matches_hf_eager_with_an_edited_mask(setup, src, dst, layers):
    hf, model, batch = setup
    edit = _reference_hooks(layers, batch, src, dst, model.cfg.n_heads)
    handles = [hf.model.language_model.layers[layer].self_attn.register_forward_pre_hook(
        edit, with_kwargs=True) for layer in layers]
    try:
        reference = _hf_logits(hf, batch)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        ours = model.run_with_hooks(batch, fwd_hooks=block_attention(
            src, dst, layers, batch=batch, model=model))
        clean = model(batch)
    real = batch.attention_mask.bool()
    assert (ours - reference)[real].abs().max() <= 1e-4
    assert (ours - clean)[real].abs().max() > 1e-3  # the knockout did something


def test_fast_sweep_equals_naive_on_every_flow(setup):
    _, model, batch = setup
    fast = information_flow(model, batch, window=3, only_correct=False, progress=False,
                            batch_size=4)
    naive = information_flow(model, batch, window=3, only_correct=False, progress=False,
                             method="naive")
    assert len(fast) == len(batch) * len(DEFAULT_FLOWS) * TEXT_LAYERS
    assert fast[["example_id", "flow", "layer"]].equals(naive[["example_id", "flow", "layer"]])
    for flow in DEFAULT_FLOWS:
        rows = fast.flow == flow
        assert (fast.p_block[rows] - naive.p_block[rows]).abs().max() < 1e-5, flow
    assert fast.rel_change.abs().max() > 1.0  # the knockouts change the prediction


def test_the_paper_pixel_rule_is_refused_outside_the_llava_families(setup):
    _, model, _ = setup
    with pytest.raises(MMLensError, match=r"related_rule='paper' .* not 'qwen2(_5)?_vl': use "
                       r"related_rule='geometry'"):
        model.prepare(_images()[:1], QUESTIONS[:1], boxes=BOXES[:1], related_rule="paper")
    with pytest.raises(ValueError, match="preprocessing 'pad' does not fit this model"):
        resolve_settings(model, preprocessing="pad")
    with pytest.raises(ValueError, match=r"pixel rule .* not 'qwen2(_5)?_vl': pass "
                       r"--related-rule geometry"):
        resolve_settings(model, "llava-hf/llava-1.5-7b-hf")  # a paper preset on Qwen
    assert resolve_settings(model, "llava-hf/llava-1.5-7b-hf",
                            related_rule="geometry").template.name == "vicuna_v1_paper"
    settings = resolve_settings(model, "Qwen/Qwen2.5-VL-7B-Instruct")
    assert (settings.template.name, settings.preprocessing, settings.related_rule,
            settings.window) == ("qwen_vl", "dynamic", "geometry", min(7, TEXT_LAYERS))


def test_examples_jsonl_holds_the_text_the_tokenizer_received(setup):
    from mmlens.experiments.provenance import example_lines

    _, model, batch = setup
    frame = information_flow(model, batch, flows=["question->last"], window=1,
                             only_correct=False, progress=False)
    tokenizer = model.processor.tokenizer
    for line in example_lines(frame.attrs["records"]):
        assert "<image>" not in line["prompt"]
        assert "<|vision_start|><|image_pad|><|image_pad|>" in line["prompt"]
        assert tokenizer(line["prompt"])["input_ids"] == line["input_ids"]
