"""``prepare`` with several images per prompt and text-only prompts, and HF's names at the
model's door: the refusals (the conformance suite checks the results against HF)."""

import pytest
import torch
from PIL import Image

from mmlens import HookedMultimodalTransformer
from mmlens.core.errors import MMLensError
from mmlens.zoo.tiny import tiny_hf_model, tiny_processor


@pytest.fixture(scope="module")
def model():
    hf = tiny_hf_model("llava")
    return HookedMultimodalTransformer.from_hf_model(hf, tiny_processor("llava", hf.config))


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (29, 45), (10, 10, 200))]


def test_several_images_get_a_span_each_and_text_only_none(model, images):
    batch = model.prepare([images, images[0], None], ["Which shape is red?"] * 3)
    per_image = model.cfg.vision.n_patches
    first = batch.spans[0]
    assert [len(first[f"image_{k}"]) for k in range(2)] == [per_image, per_image]
    assert int(first["image_0"][-1]) < int(first["image_1"][0])
    assert first["question"].min() > first["image"].max()
    assert "image_0" not in batch.spans[1] and len(batch.spans[1]["image"]) == per_image
    assert len(batch.spans[2]["image"]) == 0 and len(batch.spans[2]["system"]) > 0
    assert batch.pixel_values.shape[0] == 3 and batch.prompts[0].count("<image>") == 2


def test_boxes_and_vision_spans_need_one_image_per_prompt(model, images):
    with pytest.raises(MMLensError, match="one image per prompt"):
        model.prepare([images], ["Which shape is red?"], boxes=[[(0, 0, 5, 5)]])
    batch = model.prepare([images, None], ["Which shape is red?"] * 2)
    with pytest.raises(MMLensError, match="one image per prompt"):
        batch.vision_positions("image", model)
    with pytest.raises(MMLensError, match="tokenization='whole'"):
        model.prepare([images], ["Which shape is red?"], tokenization="chunks")


def test_entries_and_questions_must_pair(model, images):
    with pytest.raises(ValueError, match="one entry per question"):
        model.prepare([images[0], None], ["Which shape is red?"])


def test_processor_outputs_that_disagree_are_refused(model, images):
    text = ["USER: <image>\nWhich shape is red? ASSISTANT:"] * 2
    inputs = dict(model.processor(images=images, text=text, return_tensors="pt"))
    with torch.no_grad():
        model(**inputs)
        with pytest.raises(MMLensError, match="mm_token_type_ids"):
            model(**inputs, mm_token_type_ids=torch.zeros_like(inputs["input_ids"]))
        with pytest.raises(MMLensError, match="batch_num_images"):
            model(**inputs, batch_num_images=torch.tensor([1, 2]))
        with pytest.raises(MMLensError, match="input and input_ids"):
            model(inputs["input_ids"], **inputs)
        with pytest.raises(MMLensError, match="no input"):
            model(pixel_values=inputs["pixel_values"])
        with pytest.raises(MMLensError, match="mm_token_type_ids"):  # generate reads them too
            model.generate(**inputs, mm_token_type_ids=torch.zeros_like(inputs["input_ids"]))
