"""``mmlens flow`` / ``mmlens hooks`` offline on tiny saved Qwen-VL checkpoints, and loading
rules: no video processor needed, no usable processor is an error at load time."""

import base64
import html
import io
import json
import shutil

import pandas as pd
import pytest
import torch
from tiny_qwen import FAMILIES, tiny_qwen, tiny_qwen_processor

from mmlens import HookedMultimodalTransformer
from mmlens.cli import main
from mmlens.experiments import DEFAULT_FLOWS
from mmlens.experiments.presets import PRESETS


@pytest.fixture(scope="module", params=FAMILIES)
def model_dir(request, tmp_path_factory):
    """A tiny random Qwen-VL with tokenizer, PIL image processor and chat template on disk
    (and, as torchvision-free checkpoints are, no video processor)."""
    folder = tmp_path_factory.mktemp(request.param)
    tiny_qwen(request.param, text_layers=4).save_pretrained(folder)
    tiny_qwen_processor().save_pretrained(folder)
    assert not list(folder.glob("video_preprocessor*"))
    return folder


@pytest.fixture(scope="module")
def flow_run(model_dir, tmp_path_factory):
    """``mmlens flow`` on the saved checkpoint, one example of two tasks: the run folder."""
    out = tmp_path_factory.mktemp("run") / "run"
    code = main(["flow", "--model", str(model_dir), "--per-task", "1", "--no-filter", "--quiet",
                 "--tasks", "ChooseAttr,QueryAttr", "--out", str(out)])
    assert code == 0
    return out


def test_flow_runs_offline_on_a_saved_checkpoint(flow_run):
    out = flow_run
    frame = pd.read_csv(out / "flow.csv")
    assert set(frame.flow) == set(DEFAULT_FLOWS)
    assert len(frame) == 2 * len(DEFAULT_FLOWS) * 4
    assert frame.p_block.between(0, 1).all() and frame.rel_change.abs().max() > 0
    assert (out / "report.html").is_file()


def test_flow_writes_one_view_per_task_and_the_report_draws_them(flow_run):
    from PIL import Image

    from mmlens.plotting.views import view_caption

    out = flow_run
    views = json.loads((out / "views.json").read_text())
    records = {}
    for line in (out / "examples.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["example_id"]] = record
    assert [view["task"] for view in views] == ["ChooseAttr", "QueryAttr"]
    page = (out / "report.html").read_text()
    for view in views:
        spans = records[view["example_id"]]["spans"]
        image = spans["image"]
        # one cell per image token; the related cells are the sweep's related tokens
        assert view["rows"] * view["cols"] == len(image) == len(view["attention"])
        assert view["related"] == [image.index(p) for p in spans["related"]]
        png = Image.open(io.BytesIO(base64.b64decode(view["image_png"])))
        assert png.size == (view["cols"] * view["cell_px"], view["rows"] * view["cell_px"])
        assert 0 < sum(view["attention"]) <= 1 + 1e-5
        assert f"Example: {view['task']}" in page and html.escape(view_caption(view)) in page


def test_loaded_model_equals_the_hf_checkpoint(model_dir):
    model = HookedMultimodalTransformer.from_pretrained(str(model_dir))
    assert model.family.name == model.cfg.model_type
    hf = type(tiny_qwen(model.cfg.model_type)).from_pretrained(model_dir)
    from PIL import Image

    batch = model.prepare(Image.new("RGB", (30, 50), (200, 10, 10)), "What color is the circle?")
    grid = batch.image_sizes
    with torch.no_grad():
        ref = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 pixel_values=batch.pixel_values[0, :int(grid.prod())], image_grid_thw=grid,
                 mm_token_type_ids=(batch.input_ids == model.cfg.image_token_id).int()).logits
        assert (model(batch) - ref).abs().max() <= 1e-4


def test_hooks_lists_vision_merger_and_decoder_hooks(model_dir, capsys):
    assert main(["hooks", "--model", str(model_dir)]) == 0
    listed = capsys.readouterr().out
    for name in ("vision.blocks.0.hook_resid_pre", "vision.blocks.2.attn.hook_mask",
                 "merger.hook_in", "merger.hook_out", "hook_embed", "blocks.3.attn.hook_mask"):
        assert name in listed


def test_a_checkpoint_without_an_image_processor_is_refused_at_load(model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match="no usable image processor"):
        HookedMultimodalTransformer.from_pretrained(str(broken))


def test_presets_cover_the_released_checkpoints():
    for name, depth in (("Qwen/Qwen2-VL-7B-Instruct", 28), ("Qwen/Qwen2.5-VL-3B-Instruct", 36)):
        preset = PRESETS[name]
        assert preset.template.name == "qwen_vl" and preset.preprocessing == "dynamic"
        assert preset.window % 2 == 1 and abs(preset.window / depth - 7 / 32) < 0.05


def test_an_unsupported_checkpoint_is_refused_listing_the_qwen_families():
    from mmlens.model.families import family_for

    with pytest.raises(ValueError, match=r"qwen2_vl: Qwen2-VL .*qwen2_5_vl: Qwen2\.5-VL"
                                         r".*qwen3_vl: Qwen3-VL"):
        family_for("qwen3_vl_moe")
