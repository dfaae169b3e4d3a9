"""InternVL 3 on the tiny random config (``mmlens.zoo.tiny``), what the conformance suite
(parity, padded batch, generate, knockout, lens, sweep, flow) does not check: the pixel shuffle's
2x2 patches, the image-token map (``layouts.tiles``) against the tower's own data path, vision
spans, the view, bf16, every image-side hook on the data path, configs it cannot run, tiles of
another size, zero-padded tiles."""

import numpy as np
import pytest
import torch
from PIL import Image

from mmlens import HookedMultimodalTransformer
from mmlens.inputs.layouts.tiles import TilesLayout
from mmlens.inputs.vision_spans import vision_positions
from mmlens.zoo.tiny import tiny_hf_model, tiny_processor
from mmlens.zoo.tiny.internvl import IMAGE_SEQ_LENGTH, IMAGE_SIZES, SPECIALS, TILE

IMAGE = SPECIALS.index("<IMG_CONTEXT>")
START, END = SPECIALS.index("<img>"), SPECIALS.index("</img>")
# tiles per image (thumbnails included): 1 (no thumbnail), 2x1 + thumbnail, 2x2 + thumbnail;
# left padding of different lengths
BATCHES = {
    "one-tile": ([1], None),
    "three-tiles": ([3], None),
    "five-tiles": ([5], None),
    "tiles-left-padded": ([3, 1, 5], [0, 4, 2]),
}


def _inputs(tiles, pad=None, prefix=3, suffix=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.cat([torch.randint(8, 90, (prefix,), generator=gen), torch.tensor([START]),
                       torch.full((n * IMAGE_SEQ_LENGTH,), IMAGE), torch.tensor([END]),
                       torch.randint(8, 90, (suffix,), generator=gen)]) for n in tiles]
    pad = pad or [0] * len(tiles)
    width = max(len(r) + p for r, p in zip(rows, pad, strict=True))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    pixels = torch.randn(sum(tiles), 3, TILE, TILE, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def _ours(inputs):
    return (inputs["input_ids"], inputs["pixel_values"]), {
        "attention_mask": inputs["attention_mask"]}


@pytest.fixture(scope="module")
def hf():
    model = tiny_hf_model("internvl")
    model.set_attn_implementation("eager")
    return model


@pytest.fixture(scope="module")
def model(hf):
    return HookedMultimodalTransformer.from_hf_model(hf, tiny_processor("internvl", hf.config))


def test_pixel_shuffle_token_holds_its_two_by_two_patches(model):
    """Token ``(r, c)`` of a tile is the channels of patches ``(2r..2r+1, 2c..2c+1)``, in
    reading order: what ``internvl_spans`` assumes."""
    inputs = _inputs(*BATCHES["one-tile"])
    args, kwargs = _ours(inputs)
    with torch.no_grad():
        _, cache = model.run_with_cache(*args, **kwargs)
    grid = model.cfg.vision.image_size // model.cfg.vision.patch_size
    patches = cache[f"vision.blocks.{model.cfg.vision.n_layers - 1}.hook_resid_post"][0, 1:]
    patches = patches.reshape(grid, grid, -1)
    shuffled = cache["projector.hook_in"][0].reshape(grid // 2, grid // 2, 4, -1)
    for r in range(grid // 2):
        for c in range(grid // 2):
            block = patches[2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(4, -1)
            assert torch.equal(shuffled[r, c], block)


def _prepared(model):
    images = [Image.fromarray(np.random.default_rng(i).integers(
        0, 256, (size.height, size.width, 3), dtype=np.uint8))
        for i, size in enumerate(IMAGE_SIZES)]
    boxes = [[(2, 2, size.width // 2, size.height // 2)] for size in IMAGE_SIZES]
    return model.prepare(images, ["What color is the square?"] * len(images), boxes=boxes)


def test_token_map_patches_are_what_each_token_is_shuffled_from(model):
    """Each image token's map patches ``(tile, index)``, read from the tower's last block
    (index counted with the class token), concatenated are its ``projector.hook_in`` row;
    tiles then the thumbnail, kinds ``tile`` / ``thumbnail``."""
    batch = _prepared(model)
    layer = f"vision.blocks.{model.cfg.vision.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=[layer, "projector.hook_in"])
    tower, shuffled = cache[layer], cache["projector.hook_in"]
    first = 0
    for i, (n_tiles,) in enumerate(batch.image_sizes.tolist()):
        token_map = batch.token_maps[i][0]
        assert isinstance(batch.image_layout, TilesLayout) and token_map.n_tiles == n_tiles
        assert token_map.kinds == ["tile"] * (n_tiles - 1) * IMAGE_SEQ_LENGTH + [
            "thumbnail"] * IMAGE_SEQ_LENGTH
        for k, place in enumerate(token_map.tokens):
            tile, local = divmod(k, IMAGE_SEQ_LENGTH)
            assert place.tile == tile and {t for t, _ in place.patches} == {tile}
            expected = torch.cat([tower[first + t, index] for t, index in place.patches])
            assert torch.equal(shuffled[first + tile, local], expected), (i, k)
        first += n_tiles
    assert first == len(tower)


def test_vision_spans_are_each_tokens_four_patches_after_the_class_token(model):
    """``related`` on the tower: token ``(r, c)`` of a tile is patches ``1 + (2r + i) * g +
    2c + j`` of that tile's row; the map read off the inputs alone gives the same rows."""
    batch = _prepared(model)
    grid, side = model.cfg.vision.grid, model.cfg.vision.grid // 2
    rows = vision_positions(batch, "related", batch.image_layout, batch.token_maps)
    assert len(rows) == int(batch.image_sizes.sum())
    first = 0
    for i, (n_tiles,) in enumerate(batch.image_sizes.tolist()):
        image = batch.positions("image", i)
        tokens = torch.searchsorted(image, batch.positions("related", i)).tolist()
        expected = [set() for _ in range(n_tiles)]
        for k in tokens:
            tile, (r, c) = k // side**2, divmod(k % side**2, side)
            expected[tile] |= {1 + (2 * r + a) * grid + 2 * c + b for a in (0, 1) for b in (0, 1)}
        assert [set(row.tolist()) for row in rows[first:first + n_tiles]] == expected
        assert any(expected[-1]) and all(len(e) % 4 == 0 for e in expected)
        first += n_tiles
    from_inputs = vision_positions(batch, "image", batch.image_layout)
    assert [r.tolist() for r in from_inputs] == [list(range(1, grid**2 + 1))] * first


def test_view_is_the_thumbnail(model):
    from mmlens.experiments.report.views import view_grid

    batch = _prepared(model)
    view = view_grid(model, batch)
    n_tiles = int(batch.image_sizes[0])
    assert (view.rows, view.cols, view.cell_px) == (3, 3, 8)
    assert torch.equal(view.positions, batch.positions("image", 0)[-IMAGE_SEQ_LENGTH:])
    assert torch.equal(view.pixels, batch.pixel_values[0, n_tiles - 1])


def test_an_image_of_another_size_is_refused(model):
    from mmlens.core.errors import MMLensError
    from mmlens.core.sizes import ImageSize
    from mmlens.inputs.token_map import check_token_count

    batch = _prepared(model)
    with pytest.raises(MMLensError, match="gives 45 under the model's image layout"):
        check_token_count(batch.image_layout.token_map(ImageSize(50, 50)),
                          len(batch.positions("image", 0)), "example 0")


def test_bfloat16_runs_close_to_hf():
    hf = tiny_hf_model("internvl", dtype=torch.bfloat16)
    model = HookedMultimodalTransformer.from_hf_model(hf)
    inputs = _inputs(*BATCHES["tiles-left-padded"])
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    args, kwargs = _ours(inputs)
    with torch.no_grad():
        ref = hf(**inputs).logits
        ours = model(*args, **kwargs)
    assert ours.dtype == torch.bfloat16
    real = inputs["attention_mask"].bool()
    assert (ref.float().softmax(-1) - ours.float().softmax(-1))[real].abs().max() <= 2e-2


def test_every_image_side_hook_is_on_the_data_path(model):
    args, kwargs = _ours(_inputs(*BATCHES["three-tiles"]))
    with torch.no_grad():
        clean = model(*args, **kwargs)
    names = [n for n in model.hook_dict if n.startswith(("vision.", "projector."))]
    assert {"vision.embed.hook_pos_embed", "vision.blocks.2.hook_mlp_out", "projector.hook_in",
            "projector.ln.hook_scale"} <= set(names)

    def nudge(x, hook):
        if x.dtype.is_floating_point:
            gen = torch.Generator().manual_seed(0)
            return x + 0.5 * torch.randn(x.shape, generator=gen).to(x.dtype)
        blocked = x.clone()  # the vision mask: nothing attends to the class token
        blocked[..., 1:, 0] = False
        return blocked

    for name in names:
        with torch.no_grad():
            edited = model.run_with_hooks(*args, fwd_hooks=[(name, nudge)], **kwargs)
        assert (edited - clean).abs().max() > 1e-4, name


@pytest.mark.parametrize("overrides, message", [
    (dict(vision_config={"use_qk_norm": True}), "use_qk_norm"),
    (dict(vision_feature_select_strategy="full"), "class token"),
    (dict(vision_feature_layer=[-1, -2]), "list"),
    (dict(downsample_ratio=0.25), "downsample_ratio"),
    (dict(image_seq_length=16), "image_seq_length"),
    (dict(vision_config={"image_size": 20}), "even number"),
])
def test_configs_it_cannot_run_are_refused(overrides, message):
    from mmlens.model.families import from_hf_config
    from mmlens.zoo.tiny.internvl import hf_config

    with pytest.raises(ValueError, match=message):
        from_hf_config(hf_config(**overrides))


def test_tiles_of_another_size_are_refused(model):
    inputs = _inputs(*BATCHES["one-tile"])
    with pytest.raises(ValueError, match="24x24 tiles"):
        model(inputs["input_ids"], inputs["pixel_values"][..., :20, :20])


def test_padded_tiles_equal_flat_tiles_and_need_their_counts(model):
    inputs = _inputs(*BATCHES["tiles-left-padded"])
    flat = inputs["pixel_values"]  # 3 + 1 + 5 tiles
    padded = torch.zeros(3, 5, *flat.shape[1:])
    for i, (start, n) in enumerate([(0, 3), (3, 1), (4, 5)]):
        padded[i, :n] = flat[start:start + n]
    counts = torch.tensor([[3], [1], [5]])
    with torch.no_grad():
        ref = model(inputs["input_ids"], flat, attention_mask=inputs["attention_mask"])
        ours = model(inputs["input_ids"], padded, attention_mask=inputs["attention_mask"],
                     image_sizes=counts)
        assert torch.equal(ref, ours)
        with pytest.raises(ValueError, match="without image_sizes"):
            model(inputs["input_ids"], padded, attention_mask=inputs["attention_mask"])
        with pytest.raises(ValueError, match="do not fit"):
            model(inputs["input_ids"], padded, attention_mask=inputs["attention_mask"],
                  image_sizes=torch.tensor([[3], [6], [5]]))
