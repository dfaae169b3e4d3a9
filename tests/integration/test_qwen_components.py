"""Qwen-VL building blocks against Hugging Face's own modules on tiny random models."""

import pytest
import torch
from tiny_qwen import FAMILIES, IMAGE_TOKEN, MERGE, tiny_qwen, tiny_qwen_inputs
from torch import nn
from transformers.vision_utils import get_vision_window_index

from mmlens.model.components.mrope import MRotaryEmbedding, mrope_position_ids
from mmlens.model.components.qwen_vision import PatchMerger, QwenVisionTower
from mmlens.model.config import _rope_parameters
from mmlens.model.families import family_for
from mmlens.model.loading.convert_qwen import convert_qwen_vision

GRIDS = {
    "square": [(4, 4)],
    "wide": [(4, 10)],
    "tall": [(12, 6)],
    "two-images": [(6, 8), (4, 4)],
}


class _Vision(nn.Module):
    def __init__(self, hf):
        super().__init__()
        vc = family_for(hf.config.model_type).read_config(hf.config).vision
        self.vision = QwenVisionTower(vc)
        self.merger = PatchMerger(vc)
        self.load_state_dict(convert_qwen_vision(hf.state_dict(), vc), strict=True)

    def forward(self, pixel_values, grid_thw):
        return self.merger(self.vision(pixel_values, grid_thw))[0]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("grids", list(GRIDS))
def test_vision_tower_and_merger_match_hf(family, grids):
    hf = tiny_qwen(family)
    inputs = tiny_qwen_inputs(GRIDS[grids])
    ours = _Vision(hf)
    pixels, grid_thw = inputs["pixel_values"], inputs["image_grid_thw"]
    hf_outputs, our_outputs = [], []
    handles = [b.register_forward_hook(lambda m, a, out: hf_outputs.append(out))
               for b in hf.model.visual.blocks]
    handles += [b.register_forward_hook(lambda m, a, out: our_outputs.append(out[0][0]))
                for b in ours.vision.blocks]
    with torch.no_grad():
        ref = hf.model.visual(pixels, grid_thw=grid_thw)
        features = ours(pixels, grid_thw)
    for handle in handles:
        handle.remove()
    order = torch.arange(pixels.shape[0])
    if family == "qwen2_5_vl":
        # HF keeps the vision stream in window order; ours keeps the processor's order.
        vc = hf.config.vision_config
        window_index, _ = get_vision_window_index(grid_thw, MERGE, vc.window_size, vc.patch_size)
        order = (window_index[:, None] * MERGE**2 + torch.arange(MERGE**2)).flatten()
    assert (ref.pooler_output - features).abs().max() <= 1e-5
    assert len(hf_outputs) == len(our_outputs) == hf.config.vision_config.depth
    for layer, (theirs, mine) in enumerate(zip(hf_outputs, our_outputs, strict=True)):
        assert (theirs - mine[order]).abs().max() <= 1e-5, layer


@pytest.mark.parametrize("pad", [[0, 0], [0, 3], [5, 0]])
def test_mrope_position_ids_equal_hf_get_rope_index(pad):
    hf = tiny_qwen("qwen2_vl")
    inputs = tiny_qwen_inputs([(4, 6), (8, 4)], pad=pad)
    ref, ref_delta = hf.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"])
    ours, delta = mrope_position_ids(inputs["input_ids"], inputs["image_grid_thw"], IMAGE_TOKEN,
                                     MERGE, inputs["attention_mask"])
    assert torch.equal(ref, ours)
    assert torch.equal(ref_delta.reshape(-1), delta.reshape(-1))


def test_mrope_position_ids_reject_a_grid_that_does_not_fit():
    inputs = tiny_qwen_inputs([(4, 6)])
    with pytest.raises(ValueError, match="describes 2 images but the prompts hold 1"):
        mrope_position_ids(inputs["input_ids"], torch.tensor([[1, 4, 6], [1, 2, 2]]),
                           IMAGE_TOKEN, MERGE)
    with pytest.raises(ValueError, match="fewer image tokens"):
        mrope_position_ids(inputs["input_ids"], torch.tensor([[1, 8, 6]]), IMAGE_TOKEN, MERGE)


@pytest.mark.parametrize("family", FAMILIES)
def test_mrope_tables_equal_hf_rotary(family):
    hf = tiny_qwen(family)
    inputs = tiny_qwen_inputs([(4, 6), (8, 4)], pad=[0, 2])
    positions, _ = mrope_position_ids(inputs["input_ids"], inputs["image_grid_thw"], IMAGE_TOKEN,
                                      MERGE, inputs["attention_mask"])
    tc = hf.config.text_config
    inv_freq, scaling = _rope_parameters(tc)
    ours = MRotaryEmbedding(inv_freq, tc.rope_parameters["mrope_section"], scaling)
    cos, sin = ours(positions, torch.float32)
    x = torch.zeros(1, dtype=torch.float32)
    ref_cos, ref_sin = hf.model.language_model.rotary_emb(x, positions)
    assert (ref_cos - cos[:, :, 0]).abs().max() <= 1e-6
    assert (ref_sin - sin[:, :, 0]).abs().max() <= 1e-6
