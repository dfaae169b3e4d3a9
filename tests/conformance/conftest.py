"""The conformance suite's fixture: one ``Tiny`` per family with a tiny builder (HF's model with
eager attention, the hooked conversion, the processor and its outputs on the module's images)."""

from __future__ import annotations

import pytest
from families import FAMILIES, Tiny, processor_inputs, random_images

from mmlens import HookedMultimodalTransformer
from mmlens.zoo.tiny import tiny_hf_model, tiny_module, tiny_processor
from mmlens.zoo.tiny.tokenizer import QUESTIONS


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request: pytest.FixtureRequest) -> Tiny:
    name = request.param
    module = tiny_module(name)
    hf = tiny_hf_model(name)
    hf.set_attn_implementation("eager")
    processor = tiny_processor(name, hf.config)
    model = HookedMultimodalTransformer.from_hf_model(hf, processor).eval()
    images = random_images(module)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(len(images))]
    inputs = processor_inputs(model, images, questions)
    return Tiny(name, module, hf, model, processor, images, questions, inputs)
