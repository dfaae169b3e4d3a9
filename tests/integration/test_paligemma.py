"""PaliGemma 2 (Gemma 2 decoder: sliding window, soft-caps) and PaliGemma (Gemma decoder)
against Hugging Face's own model on the tiny configs of ``mmlens.zoo.tiny.paligemma``: the
image and prompt prefix attend both ways, an answer causally."""

import pytest
import torch
from PIL import Image

from mmlens import HookedMultimodalTransformer
from mmlens.core.errors import MMLensError
from mmlens.methods import block_attention
from mmlens.model.language import positions_from_mask
from mmlens.zoo.tiny import paligemma as tiny
from mmlens.zoo.tiny import tiny_hf_model, tiny_processor

DECODERS = {"gemma2": {}, "gemma": {"model_type": "gemma"}}


def _inputs(hf, n: int = 2, suffix=None) -> dict:
    generator = torch.Generator().manual_seed(1)
    images = [Image.fromarray((torch.rand(s.height, s.width, 3, generator=generator) * 255)
                              .byte().numpy()) for s in tiny.IMAGE_SIZES[:n]]
    prompts = ["<image>answer en What color is the square?", "<image>caption en"][:n]
    return tiny.hf_processor(hf.config)(images=images, text=prompts, suffix=suffix,
                                        return_tensors="pt", padding=True)


def _hf(hf, inputs, **kwargs):
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    return hf(**inputs, position_ids=positions_from_mask(inputs["attention_mask"]) + 1, **kwargs)


@pytest.fixture(scope="module", params=list(DECODERS))
def pair(request):
    hf = tiny_hf_model("paligemma", text_config=DECODERS[request.param])
    hf.set_attn_implementation("eager")
    return hf, HookedMultimodalTransformer.from_hf_model(hf, tiny_processor("paligemma",
                                                                            hf.config))


@torch.no_grad()
def test_the_composed_processor_gives_hfs_inputs(pair):
    """Without an answer suffix, the processor ``from_pretrained`` composes gives HF's
    ``PaliGemmaProcessor``'s inputs: the same tokens, pixels and (all-prefix) token types."""
    hf, model = pair
    images = [Image.fromarray((torch.rand(s.height, s.width, 3,
                                          generator=torch.Generator().manual_seed(1)) * 255)
                              .byte().numpy()) for s in tiny.IMAGE_SIZES[:1]]
    ref = tiny.hf_processor(hf.config)(images=images, text=["<image>answer en What"],
                                       return_tensors="pt")
    ours = model.processor(images=images, text=["<image><bos>answer en What\n"],
                           return_tensors="pt")
    assert set(ours) == set(ref) - {"labels"}  # HF's labels serve training
    for key in ours:
        assert torch.equal(ours[key], ref[key]), key
    assert not bool(ours["token_type_ids"].any())


@torch.no_grad()
def test_float32_parity_with_an_answer_suffix(pair):
    """A prompt with an answer (``token_type_ids`` 1 over it): the prefix attends both ways,
    the answer causally; equal to HF eager (the suite checks prompts without one)."""
    hf, model = pair
    inputs = _inputs(hf, suffix=["a red square", "a cat"])
    assert not bool(inputs["attention_mask"].all())
    assert bool(inputs["token_type_ids"].any())
    ref = _hf(hf, inputs, output_hidden_states=True)
    logits, cache = model.run_with_cache(
        inputs["input_ids"], inputs["pixel_values"], attention_mask=inputs["attention_mask"],
        token_type_ids=inputs["token_type_ids"])
    real = inputs["attention_mask"].bool()
    assert (ref.logits - logits)[real].abs().max() <= 1e-4
    for layer in range(model.cfg.n_layers):
        ours = cache[f"blocks.{layer}.hook_resid_pre"]
        assert (ref.hidden_states[layer] - ours)[real].abs().max() <= 1e-5, layer
    vision = hf.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
    for layer in range(model.cfg.vision.n_layers):
        ours = cache[f"vision.blocks.{layer}.hook_resid_post"]
        assert (vision.hidden_states[layer + 1] - ours).abs().max() <= 1e-5, layer


@torch.no_grad()
def test_prefix_attends_both_ways_and_knockout_equals_hf_eager(pair):
    hf, model = pair
    inputs = _inputs(hf, 1)
    image = (inputs["input_ids"][0] == model.cfg.image_token_id).nonzero().flatten().tolist()
    last = inputs["input_ids"].shape[1] - 1
    _, cache = model.run_with_cache(inputs["input_ids"], inputs["pixel_values"],
                                    names_filter="blocks.0.attn.hook_mask")
    assert bool(cache["blocks.0.attn.hook_mask"][0, 0, image[0], last])  # the image sees on
    hooks = block_attention(image, [last], [1, 2]) + block_attention([last], image[:4], [0])
    ours = model.run_with_hooks(inputs["input_ids"], inputs["pixel_values"], fwd_hooks=hooks)
    blocked = {1: [(last, k) for k in image], 2: [(last, k) for k in image],
               0: [(q, last) for q in image[:4]]}
    handles = []
    for layer, edges in blocked.items():
        def edit(module, args, kwargs, edges=edges):
            mask = kwargs["attention_mask"].clone()
            for query, key in edges:
                mask[:, :, query, key] = (False if mask.dtype == torch.bool
                                          else torch.finfo(mask.dtype).min)
            return args, {**kwargs, "attention_mask": mask}

        attn = hf.model.language_model.layers[layer].self_attn
        handles.append(attn.register_forward_pre_hook(edit, with_kwargs=True))
    try:
        ref = _hf(hf, inputs).logits
    finally:
        for handle in handles:
            handle.remove()
    assert (ref - _hf(hf, inputs).logits).abs().max() > 1e-3
    assert (ours - ref).abs().max() <= 1e-4


@torch.no_grad()
def test_resuming_needs_token_types(pair):
    hf, model = pair
    inputs = _inputs(hf, 1)
    logits, cache = model.run_with_cache(inputs["input_ids"], inputs["pixel_values"])
    with pytest.raises(MMLensError, match="token_type_ids"):
        model(cache["blocks.1.hook_resid_pre"], start_at_layer=1)
    resumed = model(cache["blocks.1.hook_resid_pre"], start_at_layer=1,
                    token_type_ids=inputs["token_type_ids"])
    assert (resumed - logits).abs().max() <= 1e-5


def test_bfloat16_runs_close_to_hf():
    hf = tiny_hf_model("paligemma", dtype=torch.bfloat16)
    model = HookedMultimodalTransformer.from_hf_model(hf)
    inputs = _inputs(hf)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        ref = _hf(hf, inputs).logits
        logits = model(inputs["input_ids"], inputs["pixel_values"],
                       attention_mask=inputs["attention_mask"])
    assert logits.dtype == torch.bfloat16
    real = inputs["attention_mask"].bool()
    assert (ref.float().softmax(-1) - logits.float().softmax(-1))[real].abs().max() <= 2e-2
