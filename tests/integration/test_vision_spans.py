"""Spans inside the vision tower: hand-computed patch indices on LLaVA-1.5 (both feature
strategies) and LLaVA-NeXT (base tile, high-resolution tiles, newlines), checked again on the
data path (an edit at a mapped patch changes exactly that image feature), and the knockout
helpers translating span names on vision hooks."""

import pytest
import torch
from conftest_interventions import tiny_batch, tiny_pair
from tiny_next import QUESTIONS, random_image, tiny_next, tiny_processor

from mmlens import HookedMultimodalTransformer
from mmlens.methods import ablate_positions, block_attention


def zero_at(rows: list[torch.Tensor]):
    def hook(activation, hook):
        out = activation.clone()
        for row, positions in enumerate(rows):
            out[row, positions] = 0.0
        return out

    return hook


def changed_features(model, batch, hook_name: str, rows: list[torch.Tensor], features: str):
    """Indices of the image features (rows of ``features``' flattened output) that change when
    the vision activation ``hook_name`` is zeroed at ``rows``."""
    with torch.no_grad():
        _, clean = model.run_with_cache(batch, names_filter=features)
        with model.hooks(fwd_hooks=[(hook_name, zero_at(rows))]):
            _, edited = model.run_with_cache(batch, names_filter=features)
    a = clean[features].reshape(-1, clean[features].shape[-1])
    b = edited[features].reshape(-1, edited[features].shape[-1])
    return ((a - b).abs().amax(-1) > 1e-6).nonzero()[:, 0].tolist()


@pytest.mark.parametrize("strategy, offset", [("default", 1), ("full", 0)])
def test_llava_15_indices_by_hand_and_on_the_data_path(strategy, offset):
    _, model = tiny_pair(strategy=strategy)
    batch = tiny_batch(model.cfg.hf_config, batch=2, pad=[0, 1], seed=2)
    starts = [int(batch.positions("image", i)[0]) for i in range(2)]
    # Image features 0 and 5 of example 0, feature 3 of example 1.
    batch.add_span("picked", [[starts[0], starts[0] + 5], [starts[1] + 3]])
    mapped = batch.vision_positions("picked", model)
    assert [m.tolist() for m in mapped] == [[0 + offset, 5 + offset], [3 + offset]]
    last = f"vision.blocks.{model.cfg.vision.n_layers - 1}.hook_resid_post"
    n_features = len(batch.positions("image", 0))
    changed = changed_features(model, batch, last, mapped, "projector.hook_out")
    assert changed == [0, 5, n_features + 3]


def test_llava_next_indices_by_hand_and_on_the_data_path():
    processor = tiny_processor()
    model = HookedMultimodalTransformer.from_hf_model(tiny_next(), processor=processor)
    # (height, width) 40x90: canvas 32x64 (1 x 2 tiles); unpadding would crop
    # (4 - round(40 * 8 / 90)) // 2 = 0 rows a side, so 16 base + 4 x (8 + newline) = 52 image
    # positions. 64x64: canvas 64x64 (2 x 2 tiles), 16 + 8 x 9 = 88 positions.
    images = [random_image(40, 90, seed=0), random_image(64, 64, seed=1)]
    batch = model.prepare(images, QUESTIONS[:2])
    image = [batch.positions("image", i) for i in range(2)]
    assert [len(p) for p in image] == [52, 88]
    picked = [image[0][[5, 21, 24, 36]], image[1][[50, 52]]]
    batch.add_span("picked", picked)
    mapped = batch.vision_positions("picked")
    # Example 0: base patch 5 -> index 6; feature row 0 col 5 -> tile 2, patch (0, 1) -> 2;
    # 24 is a newline (no patch); row 2 col 2 -> tile 1, patch (2, 2) -> 11.
    # Example 1 (rows 3..7): row 3 col 7 -> tile 2, patch (3, 3) -> 16; row 4 col 0 -> tile 3,
    # patch (0, 0) -> 1.
    expected = [[6], [11], [2], [], [], [16], [1], []]
    assert [m.tolist() for m in mapped] == expected
    last = f"vision.blocks.{model.cfg.vision.n_layers - 1}.hook_resid_post"
    changed = changed_features(model, batch, last, mapped, "anyres.hook_out")
    assert changed == [5, 21, 36, 52 + 50, 52 + 52]


def test_ablate_and_block_translate_span_names_on_vision_hooks():
    _, model = tiny_pair()
    batch = tiny_batch(model.cfg.hf_config, batch=2, seed=4)
    start = int(batch.positions("image", 0)[0])
    batch.add_span("picked", [[start + 2, start + 9], [start + 2, start + 9]])
    name = "vision.blocks.0.hook_resid_pre"
    explicit = [torch.tensor([3, 10])] * 2
    with torch.no_grad():
        by_hand = model.run_with_hooks(batch, fwd_hooks=[(name, zero_at(explicit))])
        by_span = model.run_with_hooks(batch, fwd_hooks=ablate_positions(
            name, "picked", batch=batch, model=model))
        by_index = model.run_with_hooks(batch, fwd_hooks=ablate_positions(name, [3, 10]))
        wrong = model.run_with_hooks(batch, fwd_hooks=[(name, zero_at(batch.span("picked")))])
        blocked_span = model.run_with_hooks(batch, fwd_hooks=block_attention(
            "picked", "cls", [0, 1], tower="vision", batch=batch, model=model))
        blocked_index = model.run_with_hooks(batch, fwd_hooks=block_attention(
            [3, 10], "cls", [0, 1], tower="vision", model=model))
    torch.testing.assert_close(by_span, by_hand)
    torch.testing.assert_close(by_index, by_hand)
    assert (wrong - by_hand).abs().max() > 1e-4  # prompt positions are other patches
    torch.testing.assert_close(blocked_span, blocked_index)
    assert (blocked_span - model(batch)).abs().max() > 1e-5


def test_untranslatable_spans_are_errors():
    _, model = tiny_pair()
    batch = tiny_batch(model.cfg.hf_config, batch=1, seed=4)
    name = "vision.blocks.0.hook_resid_pre"
    with pytest.raises(ValueError, match="not an image position, so it has no place on the "
                                         "vision tower"):
        ablate_positions(name, "question", batch=batch, model=model)
    with pytest.raises(ValueError, match=r"was not built by model.prepare \(pass model=\)"):
        ablate_positions(name, "image", batch=batch)
    with pytest.raises(ValueError, match="on the vision tower pass batch="):
        ablate_positions(name, "image")
    with pytest.raises(ValueError, match="neither the prompt's positions nor the vision"):
        ablate_positions("projector.hook_out", "image", batch=batch)
    with pytest.raises(ValueError, match="not an image position"):
        block_attention("last", "cls", [0], tower="vision", batch=batch, model=model)


def test_related_span_on_the_bundled_model_ablates_the_objects_patches():
    """``ablate_positions(vision hook, "related", batch=batch)`` on a prepared batch: the
    related image features' own patches (image position k -> patch index 1 + k), not the
    prompt positions read as patch indices."""
    from mmlens.data import shapes

    model = HookedMultimodalTransformer.from_pretrained("shapes-llava")
    example = shapes.generate_one("ChooseAttr", 0, seed=3)
    batch = model.prepare(example.load_image(), example.question, boxes=[example.boxes])
    start = int(batch.positions("image", 0)[0])
    by_hand = [1 + batch.positions("related", 0) - start]
    assert [p.tolist() for p in batch.vision_positions("related")] == [by_hand[0].tolist()]
    name = "vision.blocks.0.hook_resid_pre"
    with torch.no_grad():
        expected = model.run_with_hooks(batch, fwd_hooks=[(name, zero_at(by_hand))])
        got = model.run_with_hooks(batch, fwd_hooks=ablate_positions(name, "related",
                                                                     batch=batch))
        # Prompt positions read as patch indices ablate other patches.
        misread = model.run_with_hooks(batch, fwd_hooks=[(name, zero_at(batch.span("related")))])
    torch.testing.assert_close(got, expected)
    assert (misread - expected).abs().max() > 1e-3
