"""Gemma 3 through the study: the fast knockout sweep equals one full forward per knockout on
every flow, and ``mmlens flow`` runs offline on a saved tiny checkpoint."""

import pandas as pd
import pytest
import torch
from PIL import Image

from mmlens import HookedMultimodalTransformer
from mmlens.cli import main
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


def test_flow_runs_offline_on_a_saved_checkpoint(folder, tmp_path):
    out = tmp_path / "run"
    code = main(["flow", "--model", str(folder), "--per-task", "1", "--no-filter", "--quiet",
                 "--tasks", "ChooseAttr,QueryAttr", "--out", str(out)])
    assert code == 0
    frame = pd.read_csv(out / "flow.csv")
    assert set(frame.flow) == set(DEFAULT_FLOWS)
    assert frame.p_block.between(0, 1).all() and frame.rel_change.abs().max() > 0
    assert (out / "report.html").is_file() and (out / "views.json").is_file()


def test_vision_spans_of_pooled_tokens_are_refused(folder):
    model = HookedMultimodalTransformer.from_pretrained(str(folder))
    batch = model.prepare([Image.new("RGB", (37, 29), "red")], ["What color is the square?"],
                          boxes=[[(0, 0, 10, 10)]])
    assert batch.positions("related", 0).numel() == 1  # one pooled token under the box
    with pytest.raises(ValueError, match="pool several patches"):
        block_attention("related", "other", [0], tower="vision", batch=batch, model=model)


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
    config = json.loads((copy / "processor_config.json").read_text())
    config["image_processor"]["do_pan_and_scan"] = True
    (copy / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(MMLensError, match="pan-and-scan"):
        HookedMultimodalTransformer.from_pretrained(str(copy))
