"""LLaVA-OneVision inputs: the chat template, the composed processor (no torchvision), prepare's
spans, and loading a saved checkpoint folder (with and without its processor files)."""

import shutil

import pytest
import torch
from tiny_onevision import (
    CHAT_TEMPLATE,
    IMAGE_TOKEN,
    QUESTIONS,
    random_image,
    tiny_image_processor,
    tiny_onevision,
    tiny_processor,
)

from mmlens import HookedMultimodalTransformer
from mmlens.core.sizes import ImageSize
from mmlens.inputs.processor import ComposedProcessor
from mmlens.inputs.templates import ONEVISION, get_template

INSTRUCTION = "\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def tiny():
    hf = tiny_onevision()
    return hf, HookedMultimodalTransformer.from_hf_model(hf, processor=tiny_processor(hf.config))


def test_template_is_what_the_published_chat_template_renders():
    processor = tiny_processor()
    conversation = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": QUESTIONS[0] + INSTRUCTION}]}]
    rendered = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert rendered == ONEVISION.format(QUESTIONS[0])
    assert get_template(None, processor.tokenizer) is ONEVISION


def test_prepare_spans_and_parity_with_hf(tiny):
    hf, model = tiny
    sizes = [(40, 90), (64, 64), (10, 10)]
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    boxes = [[(0, 0, 5, 5)], [(0, 0, 64, 64)], [(2, 2, 3, 3), (7, 7, 1, 1)]]
    batch = model.prepare(images, QUESTIONS[:3], boxes=boxes)
    tok = model.tokenizer
    for i, (height, width) in enumerate(sizes):
        ids = batch.input_ids[i]
        image = batch.positions("image", i)
        assert (ids[image] == IMAGE_TOKEN).all()
        assert int((ids == IMAGE_TOKEN).sum()) == len(image) == (
            model.anyres.geometry.n_image_tokens(ImageSize(width=width, height=height)))
        question = tok.decode(ids[batch.positions("question", i)]).replace(" ", "")
        assert question == QUESTIONS[i].replace(" ", "")
        assert batch.positions("last", i).tolist() == [ids.shape[0] - 1]
        assert len(batch.positions("bos", i)) == 0  # Qwen2 has no BOS token
        related, other = batch.positions("related", i), batch.positions("other", i)
        newline = batch.positions("image_newline", i)
        parts = torch.cat([related, other, newline]).sort().values
        assert torch.equal(parts, image)  # a partition of the image positions
        rows = model.anyres.geometry.feature_grid(ImageSize(width=width, height=height)).rows
        assert len(newline) == rows and (ids[newline] == IMAGE_TOKEN).all()
    # a box in the top-left corner touches the first base patch and the first tile feature
    first = batch.positions("image", 0)
    assert first[0] in batch.positions("related", 0)
    assert batch.positions("image_tiles", 0)[0] in batch.positions("related", 0)
    assert first[15] not in batch.positions("related", 0)  # the base tile's last patch
    # a box over the whole image relates every image feature
    assert len(batch.positions("other", 1)) == 0
    mask = batch.attention_mask
    with torch.no_grad():
        ref = hf(input_ids=batch.input_ids, pixel_values=batch.pixel_values,
                 image_sizes=batch.image_sizes, attention_mask=mask,
                 position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        ours = model(batch)
    assert (ref - ours)[mask.bool()].abs().max() <= 1e-4


def test_processor_errors():
    processor = tiny_processor()
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        processor(images=[random_image(32, 32)], text=["<image> <image> a"])
    with pytest.raises(ValueError, match="no '<img>' token"):
        ComposedProcessor(processor.tokenizer, tiny_image_processor(), image_token="<img>",
                          count_image_tokens=len)


def save_checkpoint(folder, hf):
    hf.save_pretrained(folder, safe_serialization=True)
    tiny_processor(hf.config).save_pretrained(folder)
    return folder


def test_checkpoint_folder_loads_without_a_video_processor(tmp_path, tiny):
    hf, _ = tiny
    folder = save_checkpoint(tmp_path / "ov", hf)
    assert not (folder / "video_preprocessor_config.json").exists()
    model = HookedMultimodalTransformer.from_pretrained(str(folder))
    assert isinstance(model.processor, ComposedProcessor)
    assert model.processor.chat_template == CHAT_TEMPLATE
    batch = model.prepare([random_image(40, 90)], QUESTIONS[:1])
    mask = batch.attention_mask
    with torch.no_grad():
        ref = hf(input_ids=batch.input_ids, pixel_values=batch.pixel_values,
                 image_sizes=batch.image_sizes, attention_mask=mask).logits
        assert (ref - model(batch)).abs().max() <= 1e-4


def test_checkpoint_without_a_usable_processor_fails_at_load(tmp_path, tiny):
    hf, _ = tiny
    folder = save_checkpoint(tmp_path / "ov", hf)
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match="no usable tokenizer or image processor"):
        HookedMultimodalTransformer.from_pretrained(str(folder))
    shutil.rmtree(folder)


@pytest.mark.parametrize("name", ["llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
                                  "llava-hf/llava-onevision-qwen2-7b-ov-hf"])
def test_presets_use_the_chat_template_and_a_scaled_window(name):
    from mmlens.experiments.presets import PRESETS

    preset = PRESETS[name]
    assert preset.template is ONEVISION and preset.preprocessing == "anyres"
    assert preset.window % 2 == 1 and abs(preset.window / preset.n_layers - 7 / 32) < 0.05


def test_greedy_generation_matches_hf_with_and_without_cache(tiny):
    hf, model = tiny
    images = [random_image(40, 90), random_image(64, 64, seed=1)]
    batch = model.prepare(images, QUESTIONS[:2])
    mask = batch.attention_mask
    with torch.no_grad():
        expected = hf.generate(input_ids=batch.input_ids, attention_mask=mask,
                               pixel_values=batch.pixel_values, image_sizes=batch.image_sizes,
                               max_new_tokens=4, do_sample=False, eos_token_id=None,
                               pad_token_id=0)
    cached = model.generate(batch, max_new_tokens=4)
    uncached = model.generate(batch, max_new_tokens=4, use_past_kv_cache=False)
    assert torch.equal(cached, expected) and torch.equal(uncached, expected)


def test_hub_name_loads_from_the_local_hub_cache(tmp_path, tiny, monkeypatch):
    """The hub-name code path, offline: the checkpoint sits in a Hugging Face cache layout."""
    hf, _ = tiny
    snapshot = tmp_path / "models--tiny-org--tiny-onevision" / "snapshots" / ("0" * 40)
    save_checkpoint(snapshot, hf)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    model = HookedMultimodalTransformer.from_pretrained("tiny-org/tiny-onevision")
    assert model.processor.chat_template == CHAT_TEMPLATE
    batch = model.prepare([random_image(64, 64)], QUESTIONS[:1])
    with torch.no_grad():
        ref = hf(input_ids=batch.input_ids, pixel_values=batch.pixel_values,
                 image_sizes=batch.image_sizes, attention_mask=batch.attention_mask).logits
        assert (ref - model(batch)).abs().max() <= 1e-4
