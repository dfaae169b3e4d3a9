"""LLaVA-OneVision's pieces against Hugging Face in float32: the SigLIP tower, anyres-max
packing with its bilinear downscale, the image-token count, and config errors."""

from types import SimpleNamespace

import pytest
import torch
from tiny_onevision import PINPOINTS, TILE, tiny_onevision, tiny_onevision_config
from transformers import LlavaOnevisionProcessor

from mmlens.core.sizes import ImageSize
from mmlens.inputs.tiling import AnyresGeometry
from mmlens.model.anyres import AnyresPacker
from mmlens.model.families.onevision import convert_siglip_vision, onevision_config
from mmlens.model.siglip import SiglipVisionTower

# (height, width): canvases 32x64 (kept), 64x64 and 64x96 (downscaled), 64x32, and unpadded ones
SIZES = [(32, 64), (64, 64), (40, 90), (64, 32), (90, 60), (50, 50), (20, 70)]


@pytest.fixture(scope="module")
def hf():
    return tiny_onevision()


@pytest.mark.parametrize("feature_layer", [-1, -2, [-3, -1]])
def test_siglip_tower_matches_hf_hidden_states(feature_layer):
    hf = tiny_onevision(feature_layer=feature_layer)
    cfg = onevision_config(hf.config)
    tower = SiglipVisionTower(cfg)
    state = {k.removeprefix("vision."): v
             for k, v in convert_siglip_vision(hf.state_dict(), cfg).items()}
    tower.load_state_dict(state, strict=True)
    pixels = torch.randn(3, 3, TILE, TILE)
    with torch.no_grad():
        out = hf.model.vision_tower(pixels, output_hidden_states=True)
        layers = [feature_layer] if isinstance(feature_layer, int) else feature_layer
        expected = torch.cat([out.hidden_states[i] for i in layers], dim=-1)
        ours = tower(pixels)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max() <= 1e-5
    # the post-norm is not part of the features: its output differs
    assert (out.last_hidden_state - out.hidden_states[-1]).abs().max() > 1e-2


@pytest.mark.parametrize("hw", SIZES)
def test_packer_matches_hf_pack_image_features(hf, hw):
    cfg = onevision_config(hf.config)
    packer = AnyresPacker(cfg)
    packer.image_newline.data.copy_(hf.model.image_newline)
    geometry = packer.geometry
    n_tiles = geometry.n_tiles(ImageSize.from_hw(*hw))
    features = torch.randn(n_tiles, geometry.grid**2, cfg.text.d_model)
    sizes = torch.tensor([hw])
    with torch.no_grad():
        expected, lens = hf.model.pack_image_features(
            [features], sizes, image_newline=hf.model.image_newline,
            vision_aspect_ratio=hf.config.vision_aspect_ratio)
        ours = packer(features, sizes)
    assert ours.shape == expected[0].shape
    assert int(lens[0]) == geometry.n_image_tokens(ImageSize.from_hw(*hw))
    assert (ours - expected[0]).abs().max() <= 1e-6


def test_downscale_is_exercised():
    geometry = AnyresGeometry.from_config(onevision_config(tiny_onevision_config()))
    assert geometry.feature_grid(ImageSize(width=64, height=32)) == (4, 8)
    assert geometry.feature_grid(ImageSize(width=64, height=64)) == (5, 5)  # 8 x 8 kept, sqrt(2)
    # 90 wide, 40 tall on the 96 x 64 canvas: unpadding keeps rows 1..7 (6 x 12), ratio
    # sqrt(72 / 32) = 1.5
    assert geometry.kept_region(ImageSize(width=90, height=40)) == (1, 7, 0, 12)
    assert geometry.feature_grid(ImageSize(width=90, height=40)) == (4, 8)


@pytest.mark.parametrize("hw", SIZES + [(33, 200), (300, 301)])
def test_token_count_matches_hf_processor_formula(hw):
    cfg = onevision_config(tiny_onevision_config())
    geometry = AnyresGeometry.from_config(cfg)
    fake = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=PINPOINTS),
                           num_image_tokens=geometry.grid**2,
                           vision_aspect_ratio=cfg.hf_config.vision_aspect_ratio)
    fake._get_unpadded_features = lambda *a: LlavaOnevisionProcessor._get_unpadded_features(
        fake, *a)
    expected = LlavaOnevisionProcessor._get_number_of_features(fake, *hw, TILE, TILE)
    assert geometry.n_image_tokens(ImageSize.from_hw(*hw)) == expected


def test_config_errors():
    with pytest.raises(ValueError, match="use 'full'"):
        onevision_config(tiny_onevision_config(strategy="default"))
    with pytest.raises(ValueError, match="anyres_max_<n>"):
        onevision_config(tiny_onevision_config(aspect="anyres"))
