"""LLaVA-OneVision beyond the conformance suite (``tests/conformance``: float32 parity on the
tiny module's sizes and variants, padded batches): bfloat16, hooks on the data path, the tile
counts of anyres-max."""

import pytest
import torch
from tiny_onevision import onevision_inputs, tiny_onevision, tiny_processor

from mmlens import HookedMultimodalTransformer
from mmlens.core.sizes import ImageSize
from mmlens.inputs.tiling import AnyresGeometry
from mmlens.zoo.tiny.llava_onevision import IMAGE_SIZES


@pytest.fixture(scope="module")
def tiny():
    hf = tiny_onevision()
    processor = tiny_processor(hf.config)
    return hf, HookedMultimodalTransformer.from_hf_model(hf, processor=processor), processor


def test_the_conformance_sizes_cover_kept_and_downscaled_tiles(tiny):
    """What the suite's images exercise: 3 to 7 tiles, padded on the tile axis."""
    _, model, processor = tiny
    geometry = AnyresGeometry.from_config(model.cfg)
    assert [geometry.n_tiles(size) for size in IMAGE_SIZES] == [3, 5, 7, 7, 3, 7]
    sizes = [(size.height, size.width) for size in IMAGE_SIZES]
    assert onevision_inputs(processor, sizes)["pixel_values"].shape[1] == 7
    assert geometry.n_tiles(ImageSize.from_hw(64, 64)) == 5


def test_bfloat16_runs_close_to_hf(tiny):
    hf = tiny_onevision().to(torch.bfloat16)
    processor = tiny_processor(hf.config)
    model = HookedMultimodalTransformer.from_hf_model(hf, processor=processor)
    assert model.embed.W_E.dtype == torch.bfloat16
    inputs = onevision_inputs(processor, [(64, 64), (32, 64)])
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    mask = inputs["attention_mask"]
    with torch.no_grad():
        ref = hf(**inputs, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        ours = model(inputs["input_ids"], inputs["pixel_values"], attention_mask=mask,
                     image_sizes=inputs["image_sizes"])
    assert ours.dtype == torch.bfloat16 and torch.isfinite(ours).all()
    real = mask.bool()
    assert (ref.float() - ours.float())[real].abs().max() <= 0.05


def test_every_vision_hook_is_on_the_data_path(tiny):
    _, model, processor = tiny
    inputs = onevision_inputs(processor, [(40, 90)])
    args = (inputs["input_ids"], inputs["pixel_values"])
    kwargs = dict(image_sizes=inputs["image_sizes"], attention_mask=inputs["attention_mask"])
    names = [n for n in model.hook_dict if n.startswith(("vision.", "projector.", "anyres."))]
    n_blocks = len(model.vision.blocks)
    assert {f"vision.blocks.{n_blocks - 1}.hook_resid_post", "vision.hook_embed",
            "vision.embed.hook_patch_embed", "vision.blocks.0.attn.hook_pattern",
            "anyres.hook_tiles"} <= set(names)
    with torch.no_grad():
        clean = model(*args, **kwargs)
        for name in names:
            edited = model.run_with_hooks(*args, **kwargs, fwd_hooks=[(name, _edit)])
            assert (edited - clean).abs().max() > 1e-4, name


def _edit(x: torch.Tensor, hook) -> torch.Tensor:
    if x.dtype == torch.bool:  # a "may attend" mask: no query may attend the first key
        x = x.clone()
        x[..., 0] = False
        return x
    return x * 1.5 + 0.1
