"""Bad input gets a clear error that says what to do."""

import json

import pytest
import torch
from tiny import IMAGE_TOKEN, tiny_inputs, tiny_llava
from typecheck import unchecked

from mmlens import HookedMultimodalTransformer
from mmlens.model.families import from_hf_config


@pytest.fixture(scope="module")
def model_and_inputs():
    hf = tiny_llava()
    return HookedMultimodalTransformer.from_hf_model(hf), tiny_inputs(hf.config, batch=2)


def test_image_tokens_without_pixel_values(model_and_inputs):
    model, inputs = model_and_inputs
    with pytest.raises(ValueError, match="image tokens but no pixel_values"):
        model(inputs["input_ids"])


def test_image_token_count_mismatch(model_and_inputs):
    model, inputs = model_and_inputs
    ids = inputs["input_ids"].clone()
    ids[:, -1] = IMAGE_TOKEN
    with pytest.raises(ValueError, match="image tokens in input_ids but the images give"):
        model(ids, inputs["pixel_values"])


def test_pixel_values_without_image_token(model_and_inputs):
    model, inputs = model_and_inputs
    ids = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN, 5)
    with pytest.raises(ValueError, match="no image token"):
        model(ids, inputs["pixel_values"])


def test_mismatched_batch_sizes(model_and_inputs):
    model, inputs = model_and_inputs
    with pytest.raises(ValueError, match="image tokens in input_ids but the images give"):
        model(inputs["input_ids"], inputs["pixel_values"][:1])
    with pytest.raises(ValueError, match="attention_mask has batch size 1"), unchecked():
        model(inputs["input_ids"], inputs["pixel_values"],
              attention_mask=inputs["attention_mask"][:1])


def test_float_input_ids_without_start_at_layer_are_refused(model_and_inputs):
    model, inputs = model_and_inputs
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"), unchecked():
        model(inputs["input_ids"].float(), inputs["pixel_values"])


def test_injections_on_a_run_from_input_ids_are_refused(model_and_inputs):
    model, inputs = model_and_inputs
    with pytest.raises(ValueError, match="injections= resumes a run"):
        model(inputs["input_ids"], inputs["pixel_values"], injections={})


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32])
def test_a_mask_of_any_dtype_gives_the_long_masks_logits(model_and_inputs, dtype):
    model, inputs = model_and_inputs
    mask = inputs["attention_mask"].clone()
    mask[0, :2] = 0  # left padding on the first example, so the mask matters
    with torch.no_grad():
        expected = model(inputs["input_ids"], inputs["pixel_values"], attention_mask=mask.long())
        got = model(inputs["input_ids"], inputs["pixel_values"], attention_mask=mask.to(dtype))
        unmasked = model(inputs["input_ids"], inputs["pixel_values"])
    assert not torch.allclose(unmasked[0], expected[0])  # the padding is read
    assert torch.equal(got, expected)


def test_unknown_hook_name_suggests_close_matches(model_and_inputs):
    model, inputs = model_and_inputs
    with pytest.raises(KeyError, match="Did you mean blocks.0.hook_resid_pre"):
        model.run_with_hooks(inputs["input_ids"], inputs["pixel_values"],
                             fwd_hooks=[("blocks.0.hook_resid_pr", lambda x, hook: x)])


def test_unsupported_checkpoint_names_what_is_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="'gpt2' is not a supported model family: mmlens "
                       "supports llava: .*llava-hf/llava-1.5-7b-hf.*; llava_next: .*; "
                       "llava_onevision: .*llava-onevision-qwen2-0.5b-ov-hf"):
        HookedMultimodalTransformer.from_pretrained(str(tmp_path))


def test_checkpoint_without_a_processor_fails_at_load(tmp_path):
    from tiny import tiny_llava

    tiny_llava().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no usable processor"):
        HookedMultimodalTransformer.from_pretrained(str(tmp_path))


def test_unsupported_text_tower():
    from transformers import CLIPVisionConfig, LlavaConfig, MistralConfig

    config = LlavaConfig(vision_config=CLIPVisionConfig(), text_config=MistralConfig())
    with pytest.raises(ValueError, match="text model 'mistral' is not supported"):
        from_hf_config(config)


def test_residual_input_needs_start_at_layer(model_and_inputs):
    model, _ = model_and_inputs
    with pytest.raises(ValueError, match="pass start_at_layer"):
        model(torch.randn(1, 4, model.cfg.d_model))
