"""`mmlens` failures end in one line that says what to do; tables are never reported when they
disagree with their run."""

import errno
import os

import pandas as pd
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from mmlens.cli import main
from mmlens.experiments import sweep
from mmlens.experiments.runfolder import store as store_module
from mmlens.experiments.runfolder.lock import RunLock
from mmlens.zoo import BUNDLED
from mmlens.zoo.build import build_config, build_processor

pytestmark = pytest.mark.skipif(not (BUNDLED["shapes-llava"] / "config.json").is_file(),
                                reason="shapes-llava is not bundled here")
SMALL = ["--per-task", "1", "--tasks", "ChooseAttr,QueryAttr", "--quiet"]


def flow(out, *extra):
    return main(["flow", *SMALL, "--out", str(out), *extra])


def test_tables_that_disagree_with_the_run_are_not_reported(tmp_path, capsys):
    out = tmp_path / "run"
    assert flow(out) == 0
    good = (out / "flow.csv").read_bytes()
    (out / "flow.csv").write_bytes(good[:len(good) // 2])  # a table cut short by a crash
    assert main(["report", str(out)]) == 2
    err = capsys.readouterr().err
    assert "flow.csv differs from the one run.json lists" in err
    assert f"rerun the same `mmlens flow` command with --out {out}" in err
    assert flow(out) == 0 and (out / "flow.csv").read_bytes() == good  # rebuilt from the store
    assert main(["report", str(out)]) == 0

    lines = (out / "flow.jsonl").read_text().splitlines(keepends=True)
    (out / "flow.jsonl").write_text("".join(lines[:-1]))  # a store of another run
    assert main(["report", str(out)]) == 2
    assert "they are of different runs" in capsys.readouterr().err
    (out / "run.json").unlink()
    assert main(["report", str(out)]) == 2
    assert "no run.json: the run did not finish" in capsys.readouterr().err


def test_ctrl_c_says_how_to_resume_and_the_same_command_does(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real, calls = sweep._one_example, []

    def interrupted(*args, **kwargs):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "_one_example", interrupted)
    assert flow(out) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    command = f"mmlens flow {' '.join(SMALL)} --out {out}"
    assert f"interrupted, finished examples are kept; to resume, run: {command}" in err
    assert not (out / ".mmlens.lock").exists()
    monkeypatch.setattr(sweep, "_one_example", real)
    assert flow(out) == 0
    assert pd.read_csv(out / "flow.csv").example_id.nunique() == 2


def test_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "_append_line", full)
    assert flow(tmp_path / "run") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mmlens flow: error: no space left on the device while writing")
    assert "run the same command again to resume" in err


def test_a_read_only_output_folder_is_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "readonly"
    out.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: make the lock file creation fail instead
        def refuse(self):
            raise PermissionError(errno.EROFS, "Read-only file system", str(self.path))

        monkeypatch.setattr(RunLock, "acquire", refuse)
    else:
        out.chmod(0o555)
    assert flow(out) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"mmlens flow: error: cannot write {out}")
    assert err.endswith("pass --out a folder you can write to")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path, capsys):
    assert flow(tmp_path / "run", "--device", "cuda") == 2
    assert "torch sees no CUDA GPU here: pass --device cpu" in capsys.readouterr().err


def test_every_example_dropped_says_why(tmp_path, capsys):
    """A random model answers every question wrongly: the run says so and what to pass."""
    model = tmp_path / "model"
    processor = build_processor(56)
    config = build_config(len(processor.tokenizer), image_size=56, vision_layers=1,
                          text_layers=2, width=32)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(model)
    processor.save_pretrained(model)
    assert flow(tmp_path / "run", "--model", str(model)) == 2
    err = capsys.readouterr().err
    assert "all 2 examples were dropped: 2 wrong answer" in err
    assert "pass --no-filter to keep the examples the model answers wrongly" in err
    assert len(pd.read_csv(tmp_path / "run" / "dropped.csv")) == 2


@pytest.mark.parametrize("extra, message", [
    (["--threads", "0"], "threads=0 (--threads): give a whole number of at least 1"),
    (["--threads", "-2"], "threads=-2 (--threads): give a whole number of at least 1"),
    (["--seed", "-1"], "seed=-1 (--seed): give a whole number of at least 0"),
    (["--device", "tpu"], "--device 'tpu' is not a device mmlens runs on: pass cpu, cuda"),
    (["--device", "cuda:x"], "--device 'cuda:x' is not a device mmlens runs on"),
])
def test_bad_arguments_are_one_line_naming_the_flag(tmp_path, capsys, extra, message):
    assert flow(tmp_path / "run", *extra) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert last.startswith("mmlens flow: error: ") and message in last
    assert not (tmp_path / "run" / "flow.jsonl").exists()


def test_hooks_with_an_unknown_device_is_one_line(capsys):
    assert main(["hooks", "--device", "tpu"]) == 2
    assert capsys.readouterr().err.strip() == (
        "mmlens hooks: error: --device 'tpu' is not a device mmlens runs on: pass cpu, cuda, "
        "cuda:N, mps or xpu")
