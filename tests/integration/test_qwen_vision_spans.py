"""Spans inside Qwen-VL's packed vision tower: image tokens -> their merge_size**2 patches.

The expected indices are derived here from the processor's documented patch layout (each
image's grid cut into 2x2 merge blocks, blocks row-major, then row-major inside a block;
images packed in order), checked first against the pixels the processor really emits. On the
data path, zeroing the mapped patches after the last vision block changes exactly the mapped
image tokens' merger outputs, each to what the merger makes of zeros. The hooks' order is the
processor's for Qwen2.5-VL too, whose Hugging Face tower runs on a window permutation.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_qwen import FAMILIES, MERGE, PATCH, TEMPORAL, tiny_qwen, tiny_qwen_inputs
from tiny_qwen import tiny_qwen_processor as make_processor
from transformers import Qwen2VLImageProcessorPil

from mmlens import HookedMultimodalTransformer
from mmlens.methods import ablate_positions, block_attention

QUESTIONS = ["What color is the circle?", "Is there a red square?", "What shape is it?"]
# (width, height) multiples of 8 px inside the pixel range: not resized, so each image's grid
# is (height / 4, width / 4) patches. Boxes (x, y, w, h) in pixels.
SIZES = [(40, 24), (16, 32), (24, 24)]
BOXES = [[(9, 2, 10, 9)], [(0, 20, 5, 4), (12, 0, 4, 4)], [(8, 8, 8, 8)]]


def documented_order(grid_h: int, grid_w: int) -> torch.Tensor:
    """Row-major patch index of each packed patch: 2x2 blocks row-major, row-major inside."""
    grid = torch.arange(grid_h * grid_w).reshape(grid_h // MERGE, MERGE, grid_w // MERGE, MERGE)
    return grid.permute(0, 2, 1, 3).flatten()


def images(seed: int = 0) -> list[Image.Image]:
    gen = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(h, w, 3, generator=gen) * 255).byte().numpy())
            for w, h in SIZES]


def test_the_processor_packs_patches_as_documented():
    # A patch's value is its row-major index; without normalisation every element of a
    # packed row reads back as that index.
    processor = Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE,
                                         temporal_patch_size=TEMPORAL, image_mean=[0, 0, 0],
                                         image_std=[1, 1, 1], min_pixels=256, max_pixels=4096)
    width, height = 40, 24
    index = np.arange((height // PATCH) * (width // PATCH)).reshape(height // PATCH, -1)
    pixels = np.repeat(np.repeat(index, PATCH, 0), PATCH, 1).astype(np.uint8)
    out = processor(images=[Image.fromarray(np.stack([pixels] * 3, -1))], return_tensors="pt")
    rows = out["pixel_values"] * 255
    assert out["image_grid_thw"].tolist() == [[1, height // PATCH, width // PATCH]]
    assert torch.allclose(rows, rows[:, :1].expand_as(rows), atol=1e-3)
    read = rows[:, 0].round().long()
    assert torch.equal(read, documented_order(height // PATCH, width // PATCH))


def expected_patches(batch, name: str) -> torch.Tensor:
    """Packed indices of span ``name`` from the documented layout: each image token is a 2x2
    cell (row-major over the image's cells) and owns the packed places of its four patches."""
    out, offset = [], 0
    for i, (t, grid_h, grid_w) in enumerate(batch.image_sizes.tolist()):
        assert t == 1
        place = torch.argsort(documented_order(grid_h, grid_w))  # row-major patch -> packed
        image = batch.positions("image", i)
        for k in torch.searchsorted(image, batch.positions(name, i)).tolist():
            cell_row, cell_col = divmod(k, grid_w // MERGE)
            for a in range(MERGE):
                for b in range(MERGE):
                    patch = (cell_row * MERGE + a) * grid_w + cell_col * MERGE + b
                    out.append(offset + int(place[patch]))
        offset += grid_h * grid_w
    return torch.tensor(out)


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    hf = tiny_qwen(request.param, vision_layers=3)
    model = HookedMultimodalTransformer.from_hf_model(hf, processor=make_processor())
    batch = model.prepare(images(), QUESTIONS, boxes=BOXES)
    return model, batch


def test_related_and_other_map_to_the_documented_patches(setup):
    model, batch = setup
    grids = [[1, h // PATCH, w // PATCH] for w, h in SIZES]
    assert batch.image_sizes.tolist() == grids
    for name in ("related", "other", "image"):
        (mapped,) = batch.vision_positions(name)
        assert torch.equal(mapped.sort().values, expected_patches(batch, name).sort().values)
    (related,) = batch.vision_positions("related")
    (other,) = batch.vision_positions("other")
    n_patches = sum(h * w for _, h, w in grids)
    assert torch.equal(torch.cat([related, other]).sort().values, torch.arange(n_patches))
    assert len(related) < n_patches // 2  # the boxes leave most tokens unrelated
    # A sub-batch maps on its own: example 1 alone starts at packed patch 0.
    (sub_related,) = batch.select([1]).vision_positions("related")
    first, second = (h * w for _, h, w in grids[:2])
    in_second = related[(related >= first) & (related < first + second)]
    assert torch.equal(sub_related, in_second - first)


def test_zeroing_the_mapped_patches_changes_only_their_image_tokens(setup):
    model, batch = setup
    last = f"vision.blocks.{model.cfg.vision.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        _, clean = model.run_with_cache(batch, names_filter="merger.hook_out")
        with model.hooks(fwd_hooks=ablate_positions(last, "related", batch=batch)):
            _, edited = model.run_with_cache(batch, names_filter="merger.hook_out")
        zeros = model.merger(torch.zeros(1, MERGE**2, model.cfg.vision.d_model))[0, 0]
    clean, edited = clean["merger.hook_out"][0], edited["merger.hook_out"][0]
    related = torch.cat([torch.searchsorted(batch.positions("image", i),
                                            batch.positions("related", i)) + start
                         for i, start in enumerate(_token_starts(batch))])
    unrelated = torch.ones(len(clean), dtype=torch.bool)
    unrelated[related] = False
    assert torch.equal(edited[unrelated], clean[unrelated])  # bit for bit
    # Every patch of every related token was zeroed: each is the merger's output for zeros.
    torch.testing.assert_close(edited[related], zeros.expand(len(related), -1),
                               atol=1e-6, rtol=0)
    assert (clean[related] - zeros).abs().amax(-1).min() > 1e-3


def _token_starts(batch) -> list[int]:
    counts = [len(batch.positions("image", i)) for i in range(len(batch))]
    return [sum(counts[:i]) for i in range(len(counts))]


def test_span_names_and_explicit_packed_indices_are_the_same_edit(setup):
    model, batch = setup
    related, other = expected_patches(batch, "related"), expected_patches(batch, "other")
    name = "vision.blocks.0.hook_resid_pre"
    with torch.no_grad():
        by_span = model.run_with_hooks(batch, fwd_hooks=ablate_positions(
            name, "related", batch=batch))
        by_index = model.run_with_hooks(batch, fwd_hooks=ablate_positions(name, related))
        blocked_span = model.run_with_hooks(batch, fwd_hooks=block_attention(
            "related", "other", [0, 1], tower="vision", batch=batch, model=model))
        blocked_index = model.run_with_hooks(batch, fwd_hooks=block_attention(
            related, other, [0, 1], tower="vision", model=model))
        base = model(batch)
    torch.testing.assert_close(by_span, by_index, atol=0, rtol=0)
    torch.testing.assert_close(blocked_span, blocked_index, atol=0, rtol=0)
    assert (by_span - base).abs().max() > 1e-4
    assert (blocked_span - base).abs().max() > 1e-4


def test_unmappable_requests_are_errors(setup):
    model, batch = setup
    name = "vision.blocks.0.hook_resid_pre"
    with pytest.raises(ValueError, match="no class token and no fixed patch grid"):
        ablate_positions(name, "cls", batch=batch)
    with pytest.raises(ValueError, match="no class token and no fixed patch grid"):
        block_attention("patches", "related", [0], tower="vision", batch=batch, model=model)
    with pytest.raises(ValueError, match="not an image position"):
        ablate_positions(name, "question", batch=batch)
    wrong = batch.select([0, 1])
    wrong.image_sizes = batch.image_sizes[[1, 0]]
    with pytest.raises(ValueError, match="example 0 has 15 image tokens but its images in "
                                         "image_grid_thw"):
        wrong.vision_positions("related")
    extra = batch.select([0])
    extra.image_sizes = batch.image_sizes
    with pytest.raises(ValueError, match="lists 3 images but the batch's image tokens use only 1"):
        extra.vision_positions("related")


def _hf_blocks(hf, inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """HF's patch embedding (processor order) and each vision block's output (HF's order)."""
    visual = hf.model.visual
    seen: dict[str, torch.Tensor] = {}
    handles = [visual.patch_embed.register_forward_hook(
        lambda m, i, o: seen.__setitem__("embed", o))]
    handles.append(visual.blocks[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.__setitem__("in", args[0] if args else
                                                 kwargs["hidden_states"]), with_kwargs=True))
    for layer, block in enumerate(visual.blocks):
        handles.append(block.register_forward_hook(
            lambda m, i, o, layer=layer: seen.__setitem__(layer, o)))
    with torch.no_grad():
        hf(**{k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values",
                                     "image_grid_thw", "mm_token_type_ids")})
    for handle in handles:
        handle.remove()
    # Which processor-order patch HF puts at each place: match rows of its first block input.
    order = torch.cdist(seen["in"], seen["embed"]).argmin(-1)
    assert torch.equal(seen["embed"][order], seen["in"])
    return order, [seen[layer] for layer in range(len(visual.blocks))]


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_hooks_see_the_processors_order(family):
    hf = tiny_qwen(family)
    inputs = tiny_qwen_inputs([(8, 12), (4, 4)])
    model = HookedMultimodalTransformer.from_hf_model(hf)
    order, hf_blocks = _hf_blocks(hf, inputs)
    n = len(order)
    assert torch.equal(order.sort().values, torch.arange(n))
    # Qwen2.5-VL's windows (2x2 tokens) reorder the 4x6-token image; Qwen2-VL keeps the order.
    assert torch.equal(order, torch.arange(n)) == (family == "qwen2_vl")
    with torch.no_grad():
        _, cache = model.run_with_cache(
            inputs["input_ids"], inputs["pixel_values"], attention_mask=inputs["attention_mask"],
            image_sizes=inputs["image_grid_thw"], names_filter=lambda k: k.startswith("vision."))
    for layer, theirs in enumerate(hf_blocks):
        ours = cache[f"vision.blocks.{layer}.hook_resid_post"][0]
        assert (ours[order] - theirs).abs().max() <= 1e-5, layer
