"""LLaVA-OneVision's vision-tower spans: SigLIP has no class token, so an image token's tower
patch is its patch index itself (no ``+ 1``), and ``"cls"`` names nothing.

Checked on the data path (zeroing the mapped tower patches changes exactly the chosen image
features) and against Hugging Face's eager SigLIP attention with an edited mask.
"""

import numpy as np
import pytest
import torch
from tiny_onevision import PATCH, QUESTIONS, TILE, random_image, tiny_onevision, tiny_processor

from mmlens import HookedMultimodalTransformer
from mmlens.methods import ablate_positions, block_attention

N_PATCHES = (TILE // PATCH) ** 2  # 16 patches a tile, tower rows of 16 positions
SIZES = [(40, 90), (64, 64)]  # (h, w): unpadded and downscaled; downscaled


@pytest.fixture(scope="module")
def models():
    hf = tiny_onevision(text_layers=2)
    hf.set_attn_implementation("eager")
    model = HookedMultimodalTransformer.from_hf_model(hf, processor=tiny_processor(hf.config))
    return hf, model.eval()


@pytest.fixture(scope="module")
def batch(models):
    _, model = models
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    return model.prepare(images, QUESTIONS[:2], boxes=[[(3, 3, 20, 10)], [(40, 0, 20, 30)]])


def test_image_span_is_every_patch_from_zero(models, batch):
    _, model = models
    rows = batch.vision_positions("image", model)
    assert rows[0].tolist() == list(range(N_PATCHES))  # the base tile: patches 0..15
    tiles = model.anyres.select_tiles(batch.pixel_values, batch.image_sizes)
    assert len(rows) == tiles.shape[0]  # one row per tile the tower runs, base tiles first
    first = batch.token_maps[0][0].n_tiles
    assert rows[first].tolist() == list(range(N_PATCHES))  # example 1's base tile
    assert all(int(r.max()) < N_PATCHES for r in rows if len(r))
    assert block_attention("patches", "patches", [0], tower="vision",
                           model=model)[0][0] == "vision.blocks.0.attn.hook_mask"


def test_base_features_map_to_their_own_patches_on_the_data_path(models, batch):
    _, model = models
    start = int(batch.positions("image", 0)[0])
    batch.add_span("picked", [[start + 2, start + 6], []])
    mapped = batch.vision_positions("picked", model)
    assert mapped[0].tolist() == [2, 6]
    assert all(len(r) == 0 for r in mapped[1:])
    last = f"vision.blocks.{model.cfg.vision.n_layers - 1}.hook_resid_post"

    def zero(activation, hook):
        out = activation.clone()
        for row, positions in enumerate(mapped):
            out[row, positions] = 0.0
        return out

    name = "projector.hook_out"
    with torch.no_grad():
        _, clean = model.run_with_cache(batch, names_filter=name)
        with model.hooks(fwd_hooks=[(last, zero)]):
            _, edited = model.run_with_cache(batch, names_filter=name)
    a, b = (c[name].reshape(-1, c[name].shape[-1]) for c in (clean, edited))
    assert ((a - b).abs().amax(-1) > 1e-6).nonzero()[:, 0].tolist() == [2, 6]
    # ablate_positions hits the same patches
    hooks = ablate_positions(last, "picked", batch=batch, model=model)
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        _, ablated = model.run_with_cache(batch, names_filter=name)
    assert torch.equal(ablated[name], edited[name])


def test_related_features_map_to_the_patches_the_box_touches(models, batch):
    _, model = models
    related = batch.vision_positions("related", model)
    token_map = batch.token_maps[0][0]
    image = batch.positions("image", 0)
    tokens = torch.searchsorted(image, batch.positions("related", 0)).tolist()
    base = [token_map.tokens[k] for k in tokens if token_map.tokens[k].kind == "base"]
    assert base and related[0].tolist() == sorted(t.row * (TILE // PATCH) + t.col for t in base)


def test_whole_span_vision_knockout_matches_hf_eager_mask_edit(models, batch):
    hf, model = models
    layers = [0, 2]
    src = batch.vision_positions("related", model)
    dst = batch.vision_positions("image", model)

    def edit(module, args, kwargs):
        n = kwargs["hidden_states"].shape[0]
        assert n == len(dst)  # one tower row per tile, in the batch's order
        mask = torch.zeros(n, 1, N_PATCHES, N_PATCHES)
        for row in range(n):
            mask[row, :, dst[row][:, None], src[row][None, :]] = torch.finfo(mask.dtype).min
        kwargs["attention_mask"] = mask
        return args, kwargs

    handles = [hf.model.vision_tower.encoder.layers[layer].self_attn.register_forward_pre_hook(
        edit, with_kwargs=True) for layer in layers]
    mask = batch.attention_mask
    try:
        with torch.no_grad():
            reference = hf(input_ids=batch.input_ids, attention_mask=mask,
                           pixel_values=batch.pixel_values, image_sizes=batch.image_sizes,
                           position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        ours = model.run_with_hooks(batch, fwd_hooks=block_attention(
            "related", "image", layers, tower="vision", batch=batch, model=model))
        clean = model(batch)
    real = mask.bool()
    assert (ours - reference)[real].abs().max() <= 1e-4
    assert (ours - clean)[real].abs().max() > 1e-3


def test_cls_is_refused_on_a_tower_without_a_class_token(models, batch):
    _, model = models
    with pytest.raises(ValueError, match="no class token"):
        block_attention("cls", "patches", [0], tower="vision", model=model)
    with pytest.raises(ValueError, match="no class token"):
        block_attention("cls", "image", [0], tower="vision", batch=batch)
    with pytest.raises(ValueError, match="no class token"):
        ablate_positions("vision.blocks.0.hook_resid_pre", "cls", batch=batch)
    with pytest.raises(IndexError, match="patches, no class token"):
        block_attention([N_PATCHES], "patches", [0], tower="vision", model=model)


def test_image_attention_draws_the_base_tile_from_the_map(models, batch):
    from mmlens.plotting import image_attention

    _, model = models
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter="blocks.1.attn.hook_pattern")
    figure = image_attention(cache, batch, layer=1, example=1)
    base = batch.positions("image", 1)[:N_PATCHES]  # the base tile's features come first
    last = batch.positions("last", 1)
    expected = cache["blocks.1.attn.hook_pattern"][1].mean(0)[last][:, base].mean(0)
    assert np.allclose(np.asarray(figure.data[0].z), expected.reshape(4, 4).numpy())
