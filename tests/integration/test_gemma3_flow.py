"""Gemma 3 through the study: the fast knockout sweep equals one full forward per knockout on
every flow, and ``mmlens flow`` runs offline on a saved tiny checkpoint."""

import pytest
import torch
from PIL import Image

from mmlens import HookedMultimodalTransformer
from mmlens.experiments import DEFAULT_FLOWS
from mmlens.experiments.engine import clean_run, fast_knockout_probs, single_example
from mmlens.experiments.knockouts import Knockout, parse_flows, window_knockouts
from mmlens.experiments.naive import naive_knockout_probs
from mmlens.methods import block_attention
from mmlens.zoo.tiny import tiny_checkpoint


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_checkpoint("gemma3", tmp_path_factory.mktemp("gemma3"))


def test_fast_sweep_equals_the_naive_path_on_every_flow(folder):
    """The six flows, and knockouts whose targets sit inside the image (its tokens see each
    other, so the engine recomputes the whole image block)."""
    model = HookedMultimodalTransformer.from_pretrained(str(folder))
    batch = model.prepare([Image.new("RGB", (37, 29), "red")], ["What color is the square?"],
                          boxes=[[(0, 0, 12, 10)]])
    assert batch.positions("related", 0).numel() and batch.positions("other", 0).numel()
    example = single_example(batch)
    knockouts = [cell.knockout for cell in window_knockouts(
        parse_flows(DEFAULT_FLOWS), example.spans[0], 3, model.cfg.n_layers)]
    image = example.spans[0]["image"]
    knockouts += [Knockout(image[:2], image[2:], (0, 1, 2, 3, 4)),
                  Knockout(torch.tensor([0, 1]), image[2:], (1, 2, 3)),
                  Knockout(image[-1:], image[1:3], (0, 1, 2))]
    clean = clean_run(model, example)
    token = clean.prediction(exclude=model.cfg.image_token_id)
    fast = fast_knockout_probs(model, clean, knockouts, token)
    naive = naive_knockout_probs(model, example, knockouts, token)
    assert (fast - naive).abs().max() <= 1e-6  # 4.6e-5 when the image block is cut
    assert (naive - clean.prob(token)).abs().max() > 1e-4  # the knockouts do something


def test_vision_spans_of_pooled_tokens_are_their_pooled_patches(folder):
    """A pooled token's vision-tower span is its kernel x kernel block of patches, and a vision
    knockout of those patches runs."""
    model = HookedMultimodalTransformer.from_pretrained(str(folder))
    batch = model.prepare([Image.new("RGB", (37, 29), "red")], ["What color is the square?"],
                          boxes=[[(0, 0, 10, 10)]])
    # 37x29 resized to 32x32: the box reaches x < 8.6, y < 11.0, so the 8-px tokens of rows
    # and columns 0-1 of the 4x4 token grid; each pools 2x2 of the 8x8 grid of 4-px patches
    image = batch.positions("image", 0)
    assert batch.positions("related", 0).tolist() == image[[0, 1, 4, 5]].tolist()
    patches = sorted(row * 8 + col for row in range(4) for col in range(4))
    assert batch.vision_positions("related")[0].tolist() == patches
    hooks = block_attention("related", "other", [0], tower="vision", batch=batch, model=model)
    with torch.no_grad():
        assert not torch.equal(model.run_with_hooks(batch, fwd_hooks=hooks), model(batch))


def test_patching_resumes_with_the_image_blocks(folder):
    """Each resumed patch equals one full forward with the same patch hook."""
    from mmlens.methods.patching import (
        answer_prob_metric,
        corrupt_image,
        patch_activation,
        patch_positions,
    )

    model = HookedMultimodalTransformer.from_pretrained(str(folder))
    clean = model.prepare([Image.new("RGB", (37, 29), "red")], ["What color is the square?"])
    corrupted = corrupt_image(clean, noise=1.0, seed=0)
    answer = int(model(clean)[0, -1].argmax())
    metric = answer_prob_metric(answer)
    scores = patch_positions(model, clean, corrupted, metric, layers=[1])
    _, cache = model.run_with_cache(clean, names_filter="blocks.1.hook_resid_pre")
    image = int(clean.positions("image", 0)[1])
    pairs = [(torch.tensor([image]), torch.tensor([image]))]
    hooks = patch_activation("blocks.1.hook_resid_pre", cache["blocks.1.hook_resid_pre"], pairs)
    with torch.no_grad():
        full = metric(model.run_with_hooks(corrupted, fwd_hooks=hooks))
    assert abs(float(scores[0, image]) - float(full)) <= 1e-6


def test_a_pan_and_scan_processor_is_refused_at_load_time(folder, tmp_path):
    import json
    import shutil

    from mmlens.core.errors import MMLensError

    copy = shutil.copytree(folder, tmp_path / "pan")
    config = json.loads((copy / "preprocessor_config.json").read_text())
    config["do_pan_and_scan"] = True
    (copy / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(MMLensError, match="pan-and-scan"):
        HookedMultimodalTransformer.from_pretrained(str(copy))


@pytest.mark.parametrize("family", ["gemma3", "paligemma"])
@pytest.mark.parametrize("mode", ["knockout", "patch"])
def test_causal_maps_resume_whole_bidirectional_blocks(family, mode):
    """A causal map resumes from the start of Gemma 3's image block (a patched image token
    reaches the tokens before it) and PaliGemma's prefix (a knocked-out question token too):
    each region's value equals one full forward with the same knockout or patch."""
    from mmlens.methods.causal_map import causal_map
    from mmlens.zoo.tiny import tiny_hf_model, tiny_processor

    hf = tiny_hf_model(family)
    model = HookedMultimodalTransformer.from_hf_model(hf, tiny_processor(family, hf.config))
    images = [Image.new("RGB", (37, 29), "red")]
    batch = model.prepare(images, ["What color is the square?"])
    corrupted = model.prepare([Image.new("RGB", (37, 29), "blue")], ["What color is the square?"])
    layers = [1] if mode == "patch" else [1, 2]
    frame = causal_map(model, batch, "question", layers=layers, cell=2, images=images,
                       **({"mode": "patch", "corrupted": corrupted} if mode == "patch" else {}))
    with torch.no_grad():
        logits, cache = model.run_with_cache(corrupted, names_filter="blocks.1.hook_resid_pre")
        token = int(model(batch)[0, -1].argmax())
    question = batch.positions("question", 0)
    for _, row in frame.iterrows():
        positions = list(row.position)
        if mode == "patch":
            def hook(resid, hook, positions=positions):
                resid = resid.clone()
                resid[:, positions] = cache["blocks.1.hook_resid_pre"][:, positions]
                return resid

            hooks = [("blocks.1.hook_resid_pre", hook)]
        else:
            hooks = block_attention([positions], [question], layers, batch=batch)
        with torch.no_grad():
            full = model.run_with_hooks(batch, fwd_hooks=hooks)[0, -1].float().softmax(-1)
        assert abs(float(full[token]) - row.p_block) <= 1e-6, row.region
    assert (frame.p_block - frame.p_base).abs().max() > 1e-6  # the regions matter
