"""LLaVA-OneVision vision-tower knockouts: ``block_attention`` against Hugging Face's eager SigLIP
attention with an edited 4D mask (the language tower and the sweep: ``tests/conformance``)."""

import pytest
import torch
from tiny_onevision import QUESTIONS, random_image, tiny_onevision, tiny_processor

from mmlens import HookedMultimodalTransformer
from mmlens.methods import block_attention

TEXT_LAYERS = 5
SIZES = [(40, 90), (32, 64), (64, 64)]  # unpadded + downscaled, kept, downscaled (h, w)


@pytest.fixture(scope="module")
def models():
    hf = tiny_onevision(text_layers=TEXT_LAYERS)
    hf.set_attn_implementation("eager")
    model = HookedMultimodalTransformer.from_hf_model(hf, processor=tiny_processor(hf.config))
    return hf, model.eval()


@pytest.fixture(scope="module")
def batch(models):
    _, model = models
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    boxes = [[(3, 3, 20, 10)], [(40, 0, 20, 30)], [(10, 30, 20, 20)]]
    return model.prepare(images, QUESTIONS[:3], boxes=boxes)


def hf_logits(hf, batch, layers=(), edit=None, tower="language"):
    modules = (hf.model.language_model.layers if tower == "language"
               else hf.model.vision_tower.encoder.layers)
    handles = [modules[layer].self_attn.register_forward_pre_hook(edit, with_kwargs=True)
               for layer in layers]
    mask = batch.attention_mask
    try:
        with torch.no_grad():
            return hf(input_ids=batch.input_ids, attention_mask=mask,
                      pixel_values=batch.pixel_values, image_sizes=batch.image_sizes,
                      position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    finally:
        for handle in handles:
            handle.remove()


def test_vision_knockout_matches_hf_eager_mask_edit(models, batch):
    hf, model = models
    src, dst, layers = [1, 2, 3, 9], [0, 4, 7], [0, 2]
    n_tokens = model.cfg.vision.n_patches  # SigLIP: patches only, no class token

    def edit(module, args, kwargs):
        n = kwargs["hidden_states"].shape[0]
        mask = torch.zeros(n, 1, n_tokens, n_tokens)
        mask[:, :, torch.tensor(dst)[:, None], torch.tensor(src)[None, :]] = torch.finfo(
            mask.dtype).min
        kwargs["attention_mask"] = mask
        return args, kwargs

    reference = hf_logits(hf, batch, layers, edit, tower="vision")
    with torch.no_grad():
        ours = model.run_with_hooks(
            batch, fwd_hooks=block_attention(src, dst, layers, tower="vision", model=model))
    real = batch.attention_mask.bool()
    assert (ours - reference)[real].abs().max() <= 1e-4
    assert (ours - hf_logits(hf, batch))[real].abs().max() > 1e-3
