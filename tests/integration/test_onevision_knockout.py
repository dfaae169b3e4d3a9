"""LLaVA-OneVision knockouts: ``block_attention`` against Hugging Face's eager Qwen2 and SigLIP
attention with an edited 4D mask, and the fast sweep against the naive path on every flow."""

import pytest
import torch
from tiny_onevision import QUESTIONS, random_image, tiny_onevision, tiny_processor

from mmlens import HookedMultimodalTransformer
from mmlens.experiments import DEFAULT_FLOWS, information_flow
from mmlens.methods import block_attention

TEXT_LAYERS = 5
SIZES = [(40, 90), (32, 64), (64, 64)]  # unpadded + downscaled, kept, downscaled (h, w)
FLOWS = (*DEFAULT_FLOWS, "image_newline->question", "image_newline->last")


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


@pytest.mark.parametrize("src, dst, layers, heads", [
    ("image", "last", [0, 2, 4], None),
    ("related", "question", [1], None),
    ("image_newline", "question", [0, 1, 2], [1, 3]),
])
def test_language_knockout_matches_hf_eager_mask_edit(models, batch, src, dst, layers, heads):
    hf, model = models
    n_heads = model.cfg.n_heads

    def edit(module, args, kwargs):
        mask = kwargs["attention_mask"]  # HF's additive 4D mask (the batch is left-padded)
        n, q_len = kwargs["hidden_states"].shape[:2]
        mask = mask.expand(n, n_heads, q_len, mask.shape[-1]).clone()
        for i in range(n):
            rows, cols = batch.positions(dst, i), batch.positions(src, i)
            for head in heads if heads is not None else range(n_heads):
                mask[i, head, rows[:, None], cols[None, :]] = torch.finfo(mask.dtype).min
        kwargs["attention_mask"] = mask
        return args, kwargs

    reference = hf_logits(hf, batch, layers, edit)
    with torch.no_grad():
        ours = model.run_with_hooks(batch, fwd_hooks=block_attention(
            src, dst, layers, batch=batch, heads=heads, model=model))
        clean = model(batch)
    real = batch.attention_mask.bool()
    assert (ours - reference)[real].abs().max() <= 1e-4
    assert (ours - clean)[real].abs().max() > 1e-3  # the knockout did something


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


def test_fast_sweep_equals_naive_on_every_flow(models, batch):
    _, model = models
    kwargs = dict(flows=FLOWS, window=3, only_correct=False, progress=False)
    fast = information_flow(model, batch, batch_size=4, **kwargs)
    naive = information_flow(model, batch, method="naive", **kwargs)
    assert len(fast) == len(batch) * len(FLOWS) * TEXT_LAYERS
    assert fast[["example_id", "flow", "layer"]].equals(naive[["example_id", "flow", "layer"]])
    for flow in FLOWS:
        rows = fast.flow == flow
        diff = (fast.p_block[rows] - naive.p_block[rows]).abs().max()
        assert diff < 1e-5, f"{flow}: fast and naive differ by {diff}"
    assert fast.rel_change.abs().max() > 1.0  # the knockouts change the prediction
