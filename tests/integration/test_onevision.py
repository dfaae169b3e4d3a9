"""LLaVA-OneVision: float32 parity with Hugging Face's LlavaOnevisionForConditionalGeneration
(logits, packed image features, every residual stream) on several image sizes, anyres-max
downscaling and left-padded batches; bf16; hooks on the data path."""

import pytest
import torch
from tiny import hf_image_features
from tiny_onevision import onevision_inputs, tiny_onevision, tiny_processor

from mmlens import HookedMultimodalTransformer
from mmlens.core.sizes import ImageSize
from mmlens.inputs.tiling import AnyresGeometry

# (height, width): kept 4 x 8 grid, downscaled square, unpadded + downscaled, tall, tiny
SIZES = {"wide-kept": (32, 64), "square-downscaled": (64, 64),
         "unpadded-downscaled": (40, 90), "tall": (90, 60), "tiny": (10, 10),
         "elongated": (20, 70)}


@pytest.fixture(scope="module")
def tiny():
    hf = tiny_onevision()
    processor = tiny_processor(hf.config)
    return hf, HookedMultimodalTransformer.from_hf_model(hf, processor=processor), processor


def parity(hf, model, inputs) -> dict[str, float]:
    """Max |ours - HF| of the logits, the packed image features and every residual stream."""
    mask = inputs["attention_mask"]
    with torch.no_grad():
        ref = hf(**inputs, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                 output_hidden_states=True)
        logits, cache = model.run_with_cache(
            inputs["input_ids"], inputs["pixel_values"], attention_mask=mask,
            image_sizes=inputs["image_sizes"])
    real = mask.bool()
    diffs = {"logits": (ref.logits - logits)[real].abs().max().item(),
             "image_features": (hf_image_features(ref) - cache["anyres.hook_out"])
             .abs().max().item()}
    for layer in range(model.cfg.n_layers):
        diffs[f"resid_pre.{layer}"] = (ref.hidden_states[layer] -
                                       cache[f"blocks.{layer}.hook_resid_pre"])[real].abs().max().item()
    final = model.ln_final(cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"])
    diffs["final_norm"] = (ref.hidden_states[-1] - final)[real].abs().max().item()
    return diffs


def assert_parity(diffs: dict[str, float]) -> None:
    assert diffs["logits"] <= 1e-4, diffs
    assert all(v <= 1e-5 for k, v in diffs.items() if k != "logits"), diffs


@pytest.mark.parametrize("name", list(SIZES))
def test_parity_one_image(tiny, name):
    hf, model, processor = tiny
    assert_parity(parity(hf, model, onevision_inputs(processor, [SIZES[name]])))


def test_parity_left_padded_batch_of_different_images(tiny):
    hf, model, processor = tiny
    sizes = [(32, 64), (64, 64), (40, 90), (10, 10)]
    inputs = onevision_inputs(processor, sizes)
    geometry = AnyresGeometry.from_config(model.cfg)
    assert [geometry.n_tiles(ImageSize.from_hw(*hw)) for hw in sizes] == [3, 5, 7, 3]
    assert inputs["pixel_values"].shape[1] == 7  # tiles padded per image
    assert len(set(inputs["attention_mask"].sum(-1).tolist())) > 1  # left padding
    assert_parity(parity(hf, model, inputs))


@pytest.mark.parametrize("kwargs", [dict(feature_layer=-2, n_kv_heads=1),
                                    dict(feature_layer=[-3, -1], n_kv_heads=4)])
def test_parity_other_configs(kwargs):
    hf = tiny_onevision(seed=3, **kwargs)
    processor = tiny_processor(hf.config)
    model = HookedMultimodalTransformer.from_hf_model(hf, processor=processor)
    assert len(model.vision.blocks) == hf.config.vision_config.num_hidden_layers + (
        -1 if kwargs["feature_layer"] == -2 else 0)
    assert_parity(parity(hf, model, onevision_inputs(processor, [(64, 64), (20, 70)])))


def test_parity_with_tiles_that_are_not_a_whole_number_of_patches():
    """As SigLIP's 384-px tiles of 14-px patches: 36-px tiles of 8-px patches (4 x 4, 32 px)."""
    hf = tiny_onevision(seed=4, tile=36, pinpoints=[[36, 72], [72, 36], [72, 72]])
    processor = tiny_processor(hf.config)
    model = HookedMultimodalTransformer.from_hf_model(hf, processor=processor)
    assert model.anyres.geometry.grid == 4
    assert_parity(parity(hf, model, onevision_inputs(processor, [(36, 72), (80, 80), (20, 50)])))


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
