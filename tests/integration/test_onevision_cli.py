"""``mmlens flow`` and ``mmlens hooks`` offline on a tiny LLaVA-OneVision checkpoint folder
(random weights, the composed processor's files, no video processor)."""

import json

import pandas as pd
import pytest
from tiny_onevision import tiny_onevision, tiny_processor

from mmlens.cli import main
from mmlens.experiments import DEFAULT_FLOWS

TEXT_LAYERS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onevision")
    hf = tiny_onevision(text_layers=TEXT_LAYERS)
    hf.save_pretrained(folder)
    tiny_processor(hf.config).save_pretrained(folder)
    assert not (folder / "video_preprocessor_config.json").exists()
    return str(folder)


def test_flow_runs_on_a_saved_onevision_folder(model_dir, tmp_path):
    out = tmp_path / "run"
    code = main(["flow", "--model", model_dir, "--per-task", "1", "--no-filter", "--quiet",
                 "--tasks", "ChooseAttr,QueryAttr", "--out", str(out)])
    assert code == 0
    flow = pd.read_csv(out / "flow.csv")
    assert set(flow.flow) == set(DEFAULT_FLOWS)
    assert len(flow) == 2 * len(DEFAULT_FLOWS) * TEXT_LAYERS
    assert flow.p_block.between(0, 1).all() and flow.rel_change.abs().max() > 0
    run = json.loads((out / "run.json").read_text())
    assert run["n_layers"] == TEXT_LAYERS and run["n_examples"] == 2
    assert (out / "report.html").is_file()


def test_hooks_lists_the_onevision_hook_names(model_dir, capsys):
    assert main(["hooks", "--model", model_dir]) == 0
    printed = capsys.readouterr().out
    for name in ("vision.embed.hook_patch_embed", "vision.blocks.0.attn.hook_mask",
                 "projector.hook_out", "anyres.hook_tiles", "hook_embed",
                 f"blocks.{TEXT_LAYERS - 1}.attn.hook_mask"):
        assert name in printed, name
    assert "vision.ln_pre" not in printed  # SigLIP has no pre-norm
