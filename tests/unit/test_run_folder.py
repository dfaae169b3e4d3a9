"""Run folders: atomic files and their modes, temporary files left by kills, and stores with
a damaged line, a hand-edited row, a damaged first line, or two shards in one folder."""

import multiprocessing
import os
import socket
import stat
import time
import warnings

import pytest
import torch
from tiny import IMAGE_TOKEN, tiny_inputs, tiny_llava

from mmlens import HookedMultimodalTransformer
from mmlens.experiments import information_flow, sweep
from mmlens.experiments.runfolder import atomic
from mmlens.experiments.runfolder.atomic import write_atomic
from mmlens.experiments.runfolder.lock import RunLock
from mmlens.experiments.runfolder.store import read_store
from mmlens.inputs.batch import MultimodalBatch


def _write_until_killed(path, writing):
    """``write_atomic`` stopped before its rename, as by a kill at that moment."""
    atomic.os.replace = lambda *args: (writing.set(), time.sleep(60))
    write_atomic(path, "a,b\n")


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


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_files_get_the_mode_of_a_plain_open(tmp_path, umask):
    previous = os.umask(umask)
    try:
        write_atomic(tmp_path / "flow.csv", "a\n")
        with open(tmp_path / "plain.csv", "w") as handle:
            handle.write("a\n")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "flow.csv").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.csv").stat().st_mode) == 0o666 & ~umask


def test_temporary_files_of_killed_writers_are_removed_when_the_folder_is_locked(tmp_path):
    """A writer killed mid-write leaves its temporary file; the next run on the folder removes
    it, and leaves a live writer's temporary files and any other file alone."""
    context = multiprocessing.get_context("fork")
    writing = context.Event()
    killed = context.Process(target=_write_until_killed, args=(tmp_path / "flow.csv", writing))
    killed.start()
    assert writing.wait(60)
    killed.kill()
    killed.join()
    left = [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    assert len(left) == 1 and str(killed.pid) in left[0]
    host = socket.gethostname().split(".")[0]
    live = tmp_path / f".summary.csv.{host}-{os.getppid()}.abcd1234.tmp"  # pytest's parent
    other_host = tmp_path / ".dropped.csv.node-7-12.abcd1234.tmp"  # recent, on another host
    mine = tmp_path / ".notes.tmp"
    for path in (live, other_host, mine):
        path.write_text("x")
    with RunLock(tmp_path):
        pass
    assert sorted(name for name in os.listdir(tmp_path) if name.endswith(".tmp")) == sorted(
        [live.name, other_host.name, mine.name])


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
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the line was set aside: no warning on later reads
        assert information_flow(model, batch, store=store, **kwargs).equals(reference)
        read_store(store)
    assert len(computed) == 1
    assert (tmp_path / "flow.jsonl.damaged").read_text() == lines[3]


def _edit_row(store, index, old, new):
    lines = store.read_text().splitlines(keepends=True)
    assert old in lines[index]
    lines[index] = lines[index].replace(old, new, 1)
    store.write_text("".join(lines))


def test_a_hand_edited_row_is_never_merged_silently(model_and_batch, tmp_path, monkeypatch):
    """An edited row still parses; its check does not: readers refuse it, the writer
    recomputes its example."""
    model, batch = model_and_batch
    kwargs = dict(flows=["image->question"], window=3, only_correct=False, progress=False)
    store = tmp_path / "flow.jsonl"
    reference = information_flow(model, batch, store=store, **kwargs)
    _edit_row(store, 2, '"p_base":0.', '"p_base":0.9')  # example "1"
    with pytest.raises(ValueError, match=r"flow.jsonl line 3 is damaged \(check mismatch: "
                                         r"edited by hand.*rerun the same `mmlens flow`"):
        read_store(store)
    real_clean, computed = sweep.clean_run, []
    monkeypatch.setattr(sweep, "clean_run", lambda m, ex: computed.append(1) or real_clean(m, ex))
    with pytest.warns(UserWarning, match=r"line 3 is damaged \(check mismatch\)"):
        resumed = information_flow(model, batch, store=store, **kwargs)
    assert len(computed) == 1 and resumed.equals(reference)
    assert sorted(read_store(store)[1]) == ["0", "1", "2", "3"]


def test_one_damaged_byte_in_the_first_line_loses_no_row(model_and_batch, tmp_path,
                                                        monkeypatch):
    model, batch = model_and_batch
    kwargs = dict(flows=["image->question"], window=3, only_correct=False, progress=False)
    store = tmp_path / "flow.jsonl"
    reference = information_flow(model, batch, store=store, **kwargs)
    data = bytearray(store.read_bytes())
    data[5] ^= 0x20  # '"format"' -> '"formAt"'
    store.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"first line \(the run's signature\) is damaged; rerun "
                                         "the same `mmlens flow` command"):
        read_store(store)
    real_clean, computed = sweep.clean_run, []
    monkeypatch.setattr(sweep, "clean_run", lambda m, ex: computed.append(1) or real_clean(m, ex))
    with pytest.warns(UserWarning, match="its first line was damaged; the 4 rows that belong"):
        resumed = information_flow(model, batch, store=store, **kwargs)
    assert not computed and resumed.equals(reference)
    assert sorted(read_store(store)[1]) == ["0", "1", "2", "3"]
    # rows are keyed by the signature: another study's rows are not taken for this one's
    data = bytearray(store.read_bytes())
    data[5] ^= 0x20
    store.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="none of its rows belong to this run"):
        information_flow(model, batch, store=store, **{**kwargs, "window": 1})


def test_a_second_shard_in_the_same_folder_is_refused(model_and_batch, tmp_path):
    model, batch = model_and_batch
    kwargs = dict(flows=["image->question"], window=3, only_correct=False, progress=False,
                  store=tmp_path / "flow.jsonl")
    information_flow(model, batch, shard=(0, 2), **kwargs)
    with pytest.raises(ValueError, match=r"holds shard 0/2 of this study, this run is shard 1/2: "
                                         r"each shard goes to its own --out folder.*mmlens merge"):
        information_flow(model, batch, shard=(1, 2), **kwargs)
    with pytest.raises(ValueError, match="this run is the whole run"):
        information_flow(model, batch, **kwargs)
    information_flow(model, batch, shard=(0, 2), **kwargs)  # the same shard resumes
