"""LLaVA-NeXT (1.6) beyond the conformance suite (``tests/conformance``: float32 parity on the
tiny module's sizes and variants, Llama-3 rope scaling among them): tile layouts, prepare's spans
for the Vicuna and Llama-3 templates, and clear errors for bad image sizes."""

import pytest
import torch
from tiny_next import (
    IMAGE_TOKEN,
    LLAMA3_ROPE,
    QUESTIONS,
    next_inputs,
    random_image,
    tiny_next,
    tiny_processor,
)
from transformers import LlavaNextForConditionalGeneration
from typecheck import unchecked

from mmlens import HookedMultimodalTransformer
from mmlens.inputs.anyres_spans import anyres_related_positions
from mmlens.inputs.templates import LLAMA3, VICUNA_V1
from mmlens.model.families import from_hf_config

TOL = 1e-4


@pytest.fixture(scope="module")
def vicuna():
    processor = tiny_processor()
    hf = tiny_next()
    return hf, HookedMultimodalTransformer.from_hf_model(hf, processor=processor), processor


@pytest.fixture(scope="module")
def llama3():
    processor = tiny_processor(llama3=True)
    hf = tiny_next(seed=1, rope_parameters=LLAMA3_ROPE, n_kv_heads=1)
    return hf, HookedMultimodalTransformer.from_hf_model(hf, processor=processor), processor


def test_tile_layouts_agree(vicuna):
    """Padded [images, tiles, ...] pixels, flat valid tiles, and padded features all pack alike."""
    _, model, processor = vicuna
    inputs = next_inputs(processor, [(90, 40), (64, 64)])
    ids, pixels, sizes = inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"]
    flat = torch.cat([pixels[0, :3], pixels[1]])
    with torch.no_grad():
        padded_out = model(ids, pixels, attention_mask=inputs["attention_mask"], image_sizes=sizes)
        flat_out = model(ids, flat, attention_mask=inputs["attention_mask"], image_sizes=sizes)
        features = model.projector(model.vision(pixels.flatten(0, 1)))
        packed = model.anyres(features, sizes)  # features of all 10 tiles, 2 of them padding
        assert (packed - model.encode_images(pixels, sizes)).abs().max() <= 1e-6
    assert torch.equal(padded_out, flat_out)


def test_anyres_hooks_are_on_the_data_path(vicuna):
    _, model, processor = vicuna
    inputs = next_inputs(processor, [(90, 40)])
    args = (inputs["input_ids"], inputs["pixel_values"])
    with torch.no_grad():
        clean = model(*args, image_sizes=inputs["image_sizes"])
        for name in ("anyres.hook_tiles", "anyres.hook_out"):
            edited = model.run_with_hooks(*args, image_sizes=inputs["image_sizes"],
                                          fwd_hooks=[(name, lambda x, hook: x * 1.5)])
            assert (edited - clean).abs().max() > 1e-3, name


def test_prepare_matches_the_processor_and_hf(vicuna):
    hf, model, processor = vicuna
    sizes = [(90, 40), (20, 20), (64, 64)]
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    batch = model.prepare(images, QUESTIONS[:3])
    reference = next_inputs(processor, sizes, QUESTIONS[:3])
    assert torch.equal(batch.input_ids, reference["input_ids"])
    assert torch.equal(batch.pixel_values, reference["pixel_values"])
    assert torch.equal(batch.image_sizes, reference["image_sizes"])
    with torch.no_grad():
        ours = model(batch)
    assert (ours - parity_logits(hf, reference))[batch.attention_mask.bool()].abs().max() <= TOL


def parity_logits(hf: LlavaNextForConditionalGeneration, inputs: dict) -> torch.Tensor:
    mask = inputs["attention_mask"]
    with torch.no_grad():
        return hf(**inputs, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits


def test_anyres_spans_hold_the_base_tiles_and_newlines(vicuna):
    _, model, _ = vicuna
    sizes = [(90, 40), (30, 200)]
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    batch = model.prepare(images, QUESTIONS[:2])
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=["hook_embed", "projector.hook_out"])
    embed, tiles = cache["hook_embed"], cache["projector.hook_out"]
    first_tile = [0, 3]  # each image gives 3 tiles, its base tile first
    kept = [(8, 4), (2, 8)]  # (rows, cols): 2x1 and 1x2 tiles of 4x4 patches; the elongated
    # image loses 2 rows of padding to unpadding
    for i in range(2):
        image, base = batch.positions("image", i), batch.positions("image_base", i)
        high, newline = batch.positions("image_tiles", i), batch.positions("image_newline", i)
        assert torch.equal(torch.cat([base, high, newline]).sort().values, image)
        assert torch.equal(base, image[:16])
        assert len(newline) == kept[i][0] and newline[-1] == image[-1]
        assert len(high) == kept[i][0] * kept[i][1]
        assert torch.equal(newline, image[16:][kept[i][1]::kept[i][1] + 1])
        assert torch.equal(embed[i, newline], model.anyres.image_newline.expand(len(newline), -1))
        assert torch.equal(embed[i, base], tiles[first_tile[i]])
        assert (batch.input_ids[i, image] == IMAGE_TOKEN).all()


@pytest.mark.parametrize("template", [VICUNA_V1, LLAMA3])
def test_prompt_spans_for_both_templates(vicuna, llama3, template):
    _, model, processor = llama3 if template is LLAMA3 else vicuna
    question = QUESTIONS[1]
    batch = model.prepare([random_image(40, 90), random_image(64, 64)], [question, QUESTIONS[0]])
    assert batch.prompts[0] == template.format(question)
    tokens = processor.tokenizer.convert_ids_to_tokens(batch.input_ids[0].tolist())
    words = [tokens[p] for p in batch.positions("question", 0)]
    assert " ".join(words).replace(" ?", "?") == question
    last = batch.positions("last", 0)
    assert last.tolist() == [batch.input_ids.shape[1] - 1]
    assert tokens[last] == (":" if template is VICUNA_V1 else "<|end_header_id|>")
    assert tokens[batch.positions("bos", 0)[0]] == processor.tokenizer.bos_token
    system = [tokens[p] for p in batch.positions("system", 0)]
    assert system[:3] == (["A", "chat", "between"] if template is VICUNA_V1 else
                          ["<|start_header_id|>", "system", "<|end_header_id|>"])
    suffix = [tokens[p] for p in batch.positions("suffix", 0)]
    assert suffix[:2] == ["Answer", "the"]
    image = batch.positions("image", 0)
    assert image[0] == batch.positions("system", 0)[-1] + 1
    assert batch.positions("question", 0)[0] == image[-1] + 1


def test_related_spans_through_prepare(vicuna):
    _, model, _ = vicuna
    sizes, boxes = [(90, 40), (64, 64)], [[(5, 10, 12, 30)], [(40, 40, 20, 20), (0, 0, 4, 4)]]
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    batch = model.prepare(images, QUESTIONS[:2], boxes=boxes)
    for i, (h, w) in enumerate(sizes):
        image, newline = batch.positions("image", i), batch.positions("image_newline", i)
        related, other = batch.positions("related", i), batch.positions("other", i)
        local_related, _ = anyres_related_positions(boxes[i], (w, h), model.cfg)
        assert torch.equal(related, image[0] + local_related)
        assert not set(related.tolist()) & set(newline.tolist())
        assert sorted(related.tolist() + other.tolist() + newline.tolist()) == image.tolist()
        assert len(related) > 0 and (related < image[0] + 16).any() and (related >= image[16]).any()


def test_missing_or_wrong_image_sizes(vicuna):
    _, model, processor = vicuna
    inputs = next_inputs(processor, [(90, 40), (64, 64)])
    ids, pixels, sizes = inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"]
    with pytest.raises(ValueError, match="LLaVA-NeXT needs image_sizes"):
        model(ids, pixels)
    with pytest.raises(ValueError, match=r"image_sizes has shape \[2\]"), unchecked():
        model(ids, pixels, image_sizes=sizes[0])
    with pytest.raises(ValueError, match="image_sizes has 1 rows but pixel_values holds 2"):
        model(ids, pixels, image_sizes=sizes[:1])
    with pytest.raises(ValueError, match="must be positive"):
        model(ids, pixels, image_sizes=torch.tensor([[90, 40], [0, 64]]))
    with pytest.raises(ValueError, match="needs 5 tiles .* but pixel_values holds 3 per image"):
        model(ids[:1], pixels[:1, :3], image_sizes=sizes[1:])
    with pytest.raises(ValueError, match="LLaVA-NeXT takes .images, tiles, 3, H, W."), \
            unchecked():
        model(ids, pixels[0, 0], image_sizes=sizes)


def test_image_size_and_feature_count_mismatch(vicuna):
    _, model, processor = vicuna
    inputs = next_inputs(processor, [(90, 40)])
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    with pytest.raises(ValueError, match="image tokens in input_ids but the images give"):
        model(ids, pixels, image_sizes=torch.tensor([[40, 90]]))  # (width, height) by mistake
    with pytest.raises(ValueError, match="pixel_values holds 3 tiles but image_sizes"):
        model(ids, pixels[0], image_sizes=torch.tensor([[64, 64]]))
    features = torch.randn(2, 16, model.cfg.d_model)
    with pytest.raises(ValueError, match="features holds 2 tiles but image_sizes"):
        model.anyres(features, torch.tensor([[90, 40]]))
    with pytest.raises(ValueError, match="each tile has 17 features"):
        model.anyres(torch.randn(3, 17, model.cfg.d_model), torch.tensor([[90, 40]]))


def test_grid_pinpoints_the_image_cannot_use(vicuna):
    _, model, _ = vicuna
    config = tiny_next(text_layers=1).config
    config.image_grid_pinpoints = [[32, 48], [64, 64]]
    with pytest.raises(ValueError, match="pinpoint \\[32, 48\\] is not a .height, width. pair"):
        HookedMultimodalTransformer(from_hf_config(config))
    pixels = torch.randn(1, 3, 3, 32, 32)
    ids = torch.full((1, 20), IMAGE_TOKEN)
    with pytest.raises(ValueError, match="too elongated for the grid pinpoints"):
        model(ids, pixels, image_sizes=torch.tensor([[1, 5000]]))


def test_full_feature_strategy_is_refused_as_hf_fails_too():
    hf = tiny_next(strategy="full", text_layers=1)
    inputs = next_inputs(tiny_processor(), [(90, 40)])
    with pytest.raises(RuntimeError), torch.no_grad():
        hf.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    with pytest.raises(ValueError, match="vision_feature_select_strategy 'full' keeps CLIP's CLS"):
        HookedMultimodalTransformer.from_hf_model(hf)
