"""Run folders: atomic files, the folder lock, and a store with a damaged line."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from tiny import IMAGE_TOKEN, tiny_inputs, tiny_llava

from mmlens import HookedMultimodalTransformer
from mmlens.experiments import atomic, information_flow, sweep
from mmlens.experiments.atomic import write_atomic
from mmlens.experiments.lock import LOCK_NAME, FolderBusyError, RunLock
from mmlens.inputs.batch import MultimodalBatch


def test_an_interrupted_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "flow.csv"
    write_atomic(path, "a,b\n1,2\n")

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, "a,b\n" + "3,4\n" * 1000)
    assert path.read_text() == "a,b\n1,2\n"
    assert os.listdir(tmp_path) == ["flow.csv"]  # no temporary file left behind


def test_a_second_run_on_a_locked_folder_is_refused(tmp_path):
    with RunLock(tmp_path):
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(FolderBusyError,
                           match=rf"in use by another mmlens run \(pid {os.getpid()} on "
                                 rf"{socket.gethostname()}, started .*pass another --out"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()
    with RunLock(tmp_path):  # released: free again
        pass


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"pid": int(dead.stdout), "host": socket.gethostname(), "started": "earlier"}))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    # a live holder on another host cannot be checked: its lock is respected
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"pid": 1, "host": "elsewhere", "started": "earlier"}))
    with pytest.raises(FolderBusyError, match="on elsewhere"):
        RunLock(tmp_path).acquire()


@pytest.fixture(scope="module")
def model_and_batch():
    hf = tiny_llava(text_layers=4, n_kv_heads=2)
    model = HookedMultimodalTransformer.from_hf_model(hf).eval()
    inputs = tiny_inputs(hf.config, batch=4, suffix=6, pad=[0, 1, 0, 2])
    spans = []
    for row in range(4):
        image = (inputs["input_ids"][row] == IMAGE_TOKEN).nonzero().flatten()
        spans.append({"image": image, "question": torch.arange(image[-1] + 1, image[-1] + 4),
                      "last": torch.tensor([inputs["input_ids"].shape[1] - 1])})
    return model, MultimodalBatch(inputs["input_ids"], inputs["attention_mask"],
                                  inputs["pixel_values"], spans)


def test_a_damaged_line_is_skipped_and_only_its_example_recomputed(model_and_batch, tmp_path,
                                                                   monkeypatch):
    model, batch = model_and_batch
    kwargs = dict(flows=["image->question", "question->last"], window=3, only_correct=False,
                  progress=False)
    store = tmp_path / "flow.jsonl"
    reference = information_flow(model, batch, store=store, **kwargs)
    lines = store.read_text().splitlines(keepends=True)
    lines[3] = lines[3][:len(lines[3]) // 2] + "\n"  # example "2", line 4: half of it lost
    store.write_text("".join(lines))
    real_clean, computed = sweep.clean_run, []
    monkeypatch.setattr(sweep, "clean_run", lambda m, ex: computed.append(1) or real_clean(m, ex))
    with pytest.warns(UserWarning, match=r"flow.jsonl line 4 is damaged .* computed again"):
        resumed = information_flow(model, batch, store=store, **kwargs)
    assert len(computed) == 1  # the three good lines are kept
    assert resumed.equals(reference)
