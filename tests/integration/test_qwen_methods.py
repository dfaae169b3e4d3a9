"""Logit lens, activation patching and vision-side knockouts on Qwen-VL (3D positions when a
run resumes from a residual stream; packed patches on the vision side)."""

import dataclasses

import pytest
import torch
from PIL import Image
from tiny_qwen import FAMILIES, tiny_qwen, tiny_qwen_processor

from mmlens import HookedMultimodalTransformer
from mmlens.methods import block_attention
from mmlens.methods.lens import decode, lens_names, residual_stack
from mmlens.methods.patching import logit_diff_metric, patch_activation, patch_spans

QUESTIONS = ["What color is the circle?", "Is there a red square?"]


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    hf = tiny_qwen(request.param, text_layers=3)
    model = HookedMultimodalTransformer.from_hf_model(hf, processor=tiny_qwen_processor())
    gen = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(24, 40, 3, generator=gen) * 255).byte().numpy())
              for _ in QUESTIONS]
    clean = model.prepare(images, QUESTIONS)
    corrupted = dataclasses.replace(
        clean, pixel_values=torch.randn(clean.pixel_values.shape, generator=gen))
    return model, clean, corrupted


def test_lens_at_the_last_layer_is_the_model_output(setup):
    model, clean, _ = setup
    with torch.no_grad():
        logits, cache = model.run_with_cache(clean, names_filter=lens_names(model))
    stack, _ = residual_stack(cache, layers=[model.cfg.n_layers - 1], batch=clean)
    assert (decode(model, stack[0]) - logits[:, -1]).abs().max() <= 1e-5


def test_patching_resumes_at_the_prompts_3d_positions(setup):
    model, clean, corrupted = setup
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(clean)
        corrupted_logits = model(corrupted)
    answer = clean_logits[:, -1].argmax(-1).tolist()
    wrong = corrupted_logits[:, -1].argmin(-1).tolist()
    metric = logit_diff_metric(answer, wrong)
    scores = patch_spans(model, clean, corrupted, metric, spans=["image", "question"],
                         layers=[0, 2])
    # Reference: full forwards with the same patch, positions computed from the tokens.
    for row, layer in enumerate([0, 2]):
        name = f"blocks.{layer}.hook_resid_pre"
        for col, span in enumerate(["image", "question"]):
            pairs = [(clean.positions(span, i), clean.positions(span, i)) for i in range(2)]
            with torch.no_grad():
                patched = model.run_with_hooks(
                    corrupted, fwd_hooks=patch_activation(name, cache[name], pairs))
            assert scores[row, col] == pytest.approx(float(metric(patched)), abs=1e-4)
    assert scores[0, 0] == pytest.approx(float(metric(clean_logits)), abs=1e-4)


def test_vision_knockout_acts_within_an_image_only(setup):
    model, clean, _ = setup
    grid = clean.image_sizes
    first, second = int(grid[0].prod()), int(grid[1].prod())
    layers = list(range(model.cfg.vision.n_layers))
    with torch.no_grad():
        base = model(clean)
        # Patches of different images never attend to each other: blocking it changes nothing.
        across = model.run_with_hooks(clean, fwd_hooks=block_attention(
            list(range(first)), list(range(first, first + second)), layers, tower="vision",
            model=model))
        within = model.run_with_hooks(clean, fwd_hooks=block_attention(
            [0, 1, 2, 3], list(range(4, first)), layers, tower="vision", model=model))
    assert (across - base).abs().max() <= 1e-5
    assert (within[0] - base[0]).abs().max() > 1e-3
    keep = clean.attention_mask[1].bool()
    assert (within[1, keep] - base[1, keep]).abs().max() <= 1e-5  # the other image is untouched
    with pytest.raises(ValueError, match="no class token"):
        block_attention("cls", [1], [0], tower="vision", model=model)
