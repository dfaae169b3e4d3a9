"""Qwen2-VL / Qwen2.5-VL beyond the conformance suite (``tests/conformance``: float32 parity,
padded batches, generation): M-RoPE positions, bfloat16, hooks on the data path.

HF computes its own 3D positions (``get_rope_index`` with the attention mask) from
``mm_token_type_ids``; ours come from the image tokens and ``image_grid_thw``.
"""

import pytest
import torch
from tiny_qwen import FAMILIES, tiny_qwen, tiny_qwen_inputs

from mmlens import HookedMultimodalTransformer

BATCHES = {
    "square": ([(4, 4)], None),
    "wide": ([(4, 12)], None),
    "tall": ([(12, 6)], None),
    "two-sizes-left-padded": ([(6, 8), (4, 4)], [0, 4]),
    "three-aspects-padded": ([(4, 10), (8, 8), (10, 4)], [2, 0, 5]),
}


def _hf_inputs(inputs):
    return {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values",
                                   "image_grid_thw", "mm_token_type_ids")}


def _run_both(hf, inputs):
    model = HookedMultimodalTransformer.from_hf_model(hf)
    with torch.no_grad():
        ref = hf(**_hf_inputs(inputs), output_hidden_states=True)
        logits, cache = model.run_with_cache(
            inputs["input_ids"], inputs["pixel_values"], attention_mask=inputs["attention_mask"],
            image_sizes=inputs["image_grid_thw"])
    return model, ref, logits, cache


@pytest.mark.parametrize("family", FAMILIES)
def test_positions_are_hf_get_rope_index(family):
    hf = tiny_qwen(family)
    inputs = tiny_qwen_inputs(*BATCHES["three-aspects-padded"])
    model = HookedMultimodalTransformer.from_hf_model(hf)
    ref, _ = hf.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"])
    ours = model.position_ids(inputs["input_ids"], inputs["attention_mask"],
                              image_sizes=inputs["image_grid_thw"])
    assert torch.equal(ref, ours)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_runs_close_to_hf(family):
    hf = tiny_qwen(family, dtype=torch.bfloat16)
    inputs = tiny_qwen_inputs(*BATCHES["two-sizes-left-padded"])
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    model, ref, logits, _ = _run_both(hf, inputs)
    assert logits.dtype == torch.bfloat16
    real = inputs["attention_mask"].bool()
    probs = (ref.logits.float().softmax(-1) - logits.float().softmax(-1))[real]
    assert probs.abs().max() <= 2e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_every_vision_and_merger_hook_is_on_the_data_path(family):
    hf = tiny_qwen(family)
    inputs = tiny_qwen_inputs(*BATCHES["two-sizes-left-padded"])
    model = HookedMultimodalTransformer.from_hf_model(hf)
    args = (inputs["input_ids"], inputs["pixel_values"])
    kwargs = dict(attention_mask=inputs["attention_mask"], image_sizes=inputs["image_grid_thw"])
    with torch.no_grad():
        clean = model(*args, **kwargs)
    names = [n for n in model.hook_dict if n.startswith(("vision.", "merger."))]
    assert len(names) > 10 * model.cfg.vision.n_layers

    def nudge(x, hook):
        if x.dtype.is_floating_point:  # not affine: norms and softmaxes undo those
            gen = torch.Generator().manual_seed(0)
            return x + 0.5 * torch.randn(x.shape, generator=gen).to(x.dtype)
        blocked = x.clone()  # hook_mask: nobody but patch 0 itself may attend to patch 0
        blocked[..., 1:, 0] = False
        return blocked

    for name in names:
        with torch.no_grad():
            edited = model.run_with_hooks(*args, fwd_hooks=[(name, nudge)], **kwargs)
        assert (edited - clean).abs().max() > 1e-4, name
