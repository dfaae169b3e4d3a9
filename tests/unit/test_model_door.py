"""What enters ``forward`` (``mmlens.model.door``): a run from input_ids refuses a residual
stream and resumed-run injections; the attention mask is read the same in any integer or bool
dtype."""

import pytest
import torch
from tiny import tiny_inputs, tiny_llava
from typecheck import unchecked

from mmlens import HookedMultimodalTransformer


@pytest.fixture(scope="module")
def model_and_inputs():
    hf = tiny_llava()
    return HookedMultimodalTransformer.from_hf_model(hf), tiny_inputs(hf.config, batch=2)


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
