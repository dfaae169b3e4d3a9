"""Qwen3-VL through the study: a saved tiny folder loads and runs ``mmlens flow`` offline with
its own prompt; the DeepStack removal flow; the fast sweep equals the naive one; patching
resumes with the run's DeepStack features."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mmlens import HookedMultimodalTransformer
from mmlens.cli import main
from mmlens.core.errors import MMLensError
from mmlens.experiments import information_flow
from mmlens.experiments.engine import clean_run, fast_knockout_probs
from mmlens.experiments.knockouts import Knockout
from mmlens.experiments.naive import naive_knockout_probs
from mmlens.inputs.templates import QWEN3_VL
from mmlens.methods.patching import logit_diff_metric, patch_activation, patch_spans
from mmlens.zoo.tiny import tiny_checkpoint, tiny_hf_model

FLOWS = ["image->last", "question->last", "deepstack->image", "deepstack->related"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_checkpoint("qwen3_vl", tmp_path_factory.mktemp("qwen3_vl"),
                           text_config={"num_hidden_layers": 4})


@pytest.fixture(scope="module")
def model(folder):
    return HookedMultimodalTransformer.from_pretrained(str(folder))


def _images():
    images = []
    for width, height, box in ((45, 29, (8, 0, 8, 8)), (22, 38, (0, 20, 12, 10))):
        pixels = np.zeros((height, width, 3), dtype=np.uint8)
        x, y, w, h = box
        pixels[y:y + h, x:x + w] = 255
        images.append(Image.fromarray(pixels))
    return images, [[(8, 0, 8, 8)], [(0, 20, 12, 10)]]


def test_saved_folder_loads_with_its_own_prompt_and_equals_hf(folder, model):
    hf = type(tiny_hf_model("qwen3_vl")).from_pretrained(folder).eval()
    images, boxes = _images()
    batch = model.prepare(images, ["What color is the square?", "Which shape is red?"],
                          boxes=boxes)
    text = model.processor.tokenizer.decode(batch.input_ids[0, batch.attention_mask[0].bool()])
    assert text.startswith("<|im_start|> user <|vision_start|>")  # no system prompt
    assert model.family.prompt_template == QWEN3_VL.name
    grid = batch.image_sizes
    pixels = torch.cat([p[:n] for p, n in zip(batch.pixel_values, grid.prod(-1), strict=True)])
    with torch.no_grad():
        ref = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 pixel_values=pixels, image_grid_thw=grid,
                 mm_token_type_ids=(batch.input_ids == model.cfg.image_token_id).int()).logits
        ours = model(batch)
    real = batch.attention_mask.bool()
    assert (ref - ours)[real].abs().max() <= 1e-4


def test_hooks_lists_the_deepstack_hooks(folder, capsys):
    assert main(["hooks", "--model", str(folder)]) == 0
    listed = capsys.readouterr().out
    for name in ("vision.hook_pos_embed", "deepstack.1.hook_out", "blocks.1.hook_deepstack",
                 "blocks.0.attn.q_norm.hook_scale"):
        assert name in listed
    assert "blocks.2.hook_deepstack" not in listed  # two injections in the tiny config


def test_flow_runs_offline_with_the_deepstack_flow(folder, tmp_path):
    out = tmp_path / "run"
    code = main(["flow", "--model", str(folder), "--per-task", "1", "--no-filter", "--quiet",
                 "--tasks", "ChooseAttr,QueryAttr", "--flows", ",".join(FLOWS[:3]),
                 "--out", str(out)])
    assert code == 0
    frame = pd.read_csv(out / "flow.csv")
    assert set(frame.flow) == set(FLOWS[:3])
    deep = frame[frame.flow == "deepstack->image"]
    # a window holding a DeepStack layer changes the answer's probability; one past them cannot
    assert deep.rel_change.abs().max() > 0
    assert (out / "report.html").is_file()


def test_fast_sweep_equals_naive_with_deepstack_flows(model):
    images, boxes = _images()
    batch = model.prepare(images, ["What color is the square?", "Which shape is red?"],
                          boxes=boxes)
    runs = {method: information_flow(model, batch, flows=FLOWS, window=1, method=method,
                                     only_correct=False)
            for method in ("fast", "naive")}
    fast, naive = (runs[m].sort_values(["example_id", "flow", "layer"]) for m in runs)
    assert np.abs(fast.p_block.to_numpy() - naive.p_block.to_numpy()).max() <= 1e-5
    deep = fast[fast.flow == "deepstack->image"]
    changed = deep[(deep.p_block - deep.p_base).abs() > 1e-5].layer.unique()
    assert set(changed) and set(changed) <= {0, 1}  # windows of 1 around the injected blocks


def test_deepstack_flows_are_refused_on_models_without_deepstack():
    hf = tiny_hf_model("qwen3_vl")
    other = HookedMultimodalTransformer.from_hf_model(hf)
    other.cfg.text.deepstack_layers = 0  # as every other family
    from mmlens.experiments.knockouts import flow_spans, parse_flows

    with pytest.raises(MMLensError, match="does not add"):
        flow_spans({"image": torch.arange(3)}, other, parse_flows("deepstack->image"))


def test_patching_resumes_with_the_runs_deepstack_features(model):
    images, _ = _images()
    clean = model.prepare(images, ["What color is the square?", "Which shape is red?"])
    gen = torch.Generator().manual_seed(0)
    corrupted = dataclasses.replace(
        clean, pixel_values=torch.randn(clean.pixel_values.shape, generator=gen))
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(clean)
        corrupted_logits = model(corrupted)
    metric = logit_diff_metric(clean_logits[:, -1].argmax(-1).tolist(),
                               corrupted_logits[:, -1].argmin(-1).tolist())
    scores = patch_spans(model, clean, corrupted, metric, spans=["image", "question"],
                         layers=[0, 1, 3])
    for row, layer in enumerate([0, 1, 3]):
        name = f"blocks.{layer}.hook_resid_pre"
        for col, span in enumerate(["image", "question"]):
            pairs = [(clean.positions(span, i), clean.positions(span, i)) for i in range(2)]
            with torch.no_grad():
                patched = model.run_with_hooks(
                    corrupted, fwd_hooks=patch_activation(name, cache[name], pairs))
            assert scores[row, col] == pytest.approx(float(metric(patched)), abs=1e-4)


def test_fast_engine_skips_what_a_knockout_cannot_change(model):
    """A DeepStack removal after block 0 resumes at block 1 (block 0 computes what the clean
    run did; only the features added to its output differ), a knockout that blocks nothing
    runs no block, a knockout given twice runs once; all give the naive path's numbers."""
    images, boxes = _images()
    batch = model.prepare(images[:1], ["What color is the square?"], boxes=boxes[:1])
    image = batch.positions("image", 0)
    knockouts = [Knockout(image, image, (0,), removes_injection=True),
                 Knockout(image, image, (0, 1), removes_injection=True),
                 Knockout(image[:0], image, (1,)),
                 Knockout(image, image, (0, 1), removes_injection=True)]
    clean = clean_run(model, batch)
    token = clean.prediction(exclude=model.cfg.image_token_id)
    rows = dict.fromkeys(range(model.cfg.n_layers), 0)

    def count(resid, hook):
        rows[int(hook.name.split(".")[1])] += resid.shape[0]

    with model.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", count)
                                for layer in rows]):
        fast = fast_knockout_probs(model, clean, knockouts, token)
    assert rows == {0: 0, 1: 2, 2: 2, 3: 2}
    naive = naive_knockout_probs(model, batch, knockouts, token)
    assert torch.allclose(fast, naive, atol=1e-5)
    assert fast[2] == pytest.approx(clean.prob(token)) and fast[3] == fast[1]
    assert (fast[:2] - clean.prob(token)).abs().max() > 1e-4  # the removals change p
