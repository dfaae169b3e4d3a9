"""Run folders across processes: torchrun ranks, job-array shards, and kills at any moment.

Every run here is the bundled model on the same examples; each must give the rows of one
uninterrupted single-process run, each example stored exactly once.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from mmlens.cli import main
from mmlens.experiments.runfolder.store import read_store, shard_files
from mmlens.experiments.tables import check_run_folder
from mmlens.zoo import BUNDLED

pytestmark = pytest.mark.skipif(not (BUNDLED["shapes-llava"] / "config.json").is_file(),
                                reason="shapes-llava is not bundled here")
ARGS = ["flow", "--per-task", "3", "--quiet"]
TABLES = ("flow.csv", "dropped.csv", "summary.csv", "emergence.csv")
ROOT = Path(__file__).resolve().parents[2]


def command(out, processes=1):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", str(processes)] if processes > 1 else [sys.executable])
    return [*launcher, "-m", "mmlens.cli", *ARGS, "--out", str(out)]


def environment():
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run(out, processes=1):
    done = subprocess.run(command(out, processes), env=environment(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def file_ids(file):
    lines = file.read_text().split("\n")[1:-1]  # header; text after the last newline
    return [json.loads(line)["example_id"] for line in lines]


def store_ids(out):
    """Every example id in every shard of the store, repeats included."""
    return [i for file in shard_files(out / "flow.jsonl") for i in file_ids(file)]


def assert_same_run(out, reference):
    check_run_folder(out)
    for name in TABLES:
        pd.testing.assert_frame_equal(pd.read_csv(out / name), pd.read_csv(reference / name),
                                      check_exact=True, obj=name)
    for name in ("examples.jsonl", "views.json"):
        assert (out / name).read_text() == (reference / name).read_text(), name
    ids = store_ids(out)
    assert sorted(ids) == sorted(set(ids)) == sorted(read_store(reference / "flow.jsonl")[1])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("one-process")
    assert main([*ARGS, "--out", str(out)]) == 0
    return out


def test_two_ranks_give_the_rows_of_one_process(reference, tmp_path):
    out = tmp_path / "ranks"
    done = run(out, processes=2)
    assert_same_run(out, reference)
    assert done.stderr.count("results in") + done.stdout.count("results in") == 1  # rank 0
    ranks = [set(file_ids(file)) for file in shard_files(out / "flow.jsonl")]
    assert len(ranks) == 2 and ranks[0] and ranks[1] and not ranks[0] & ranks[1]
    summary = json.loads((out / "run.json").read_text())
    assert summary["world_size"] == 2
    assert summary["examples_per_rank"] == [len(ranks[0]), len(ranks[1])]
    assert sum(summary["examples_per_rank"]) == summary["n_examples"] == 18


def _children(pid):
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def test_a_killed_rank_then_one_process_finish_the_run(reference, tmp_path):
    out = tmp_path / "killed"
    launcher = subprocess.Popen(command(out, processes=2), env=environment(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rank_one = out / "flow.rank1.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (
            rank_one.is_file() and rank_one.read_text().count("\n") >= 2):
        time.sleep(0.005)
    workers = _children(launcher.pid)
    assert len(workers) == 2, "the ranks did not start"
    os.kill(max(workers), signal.SIGKILL)  # the rank started second
    assert launcher.wait(timeout=120) != 0
    assert 0 < len(set(store_ids(out))) < 18, "the kill came too late to test a resume"
    run(out, processes=1)  # resumed on one process
    assert_same_run(out, reference)


def test_shards_merged_equal_one_run(reference, tmp_path, capsys):
    parts = [tmp_path / f"part-{k}" for k in range(3)]
    for k, part in enumerate(parts):
        assert main([*ARGS, "--shard", f"{k}/3", "--out", str(part)]) == 0
    assert main(["merge", str(tmp_path / "missing"), *map(str, parts[:2])]) == 2
    assert "examples are in no shard" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "twice"), *map(str, parts), str(parts[0])]) == 2
    assert "the shards overlap" in capsys.readouterr().err
    merged = tmp_path / "merged"
    assert main(["merge", str(merged), *map(str, parts)]) == 0
    assert_same_run(merged, reference)
    other = tmp_path / "other-window"
    assert main([*ARGS, "--shard", "2/3", "--window", "1", "--out", str(other)]) == 0
    assert main(["merge", str(tmp_path / "mixed"), *map(str, parts[:2]), str(other)]) == 2
    err = capsys.readouterr().err
    assert "shards of different studies (they differ in window)" in err


@pytest.mark.slow
def test_killed_at_random_moments_the_run_resumes_to_the_same_rows(reference, tmp_path):
    """SIGKILL at random times, and as each of the first tables is being replaced."""
    out = tmp_path / "crashes"
    rng = random.Random(0)
    kills = [("time", rng.uniform(0.5, 3.5)) for _ in range(6)] + [
        ("table", n) for n in (1, 2, 3, 4)]
    rng.shuffle(kills)
    caught_writing = 0
    for kind, when in kills:
        process = subprocess.Popen(command(out), env=environment(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kind == "time":
            time.sleep(when)
        else:  # the when-th temporary file seen in the folder: a table being written
            seen: set[str] = set()
            while process.poll() is None and len(seen) < when:
                if out.is_dir():
                    seen |= {name for name in os.listdir(out) if name.endswith(".tmp")}
            caught_writing += len(seen) >= when and process.poll() is None
        process.kill()
        process.wait()
        ids = store_ids(out) if (out / "flow.jsonl").is_file() else []
        assert len(ids) == len(set(ids)), "an example was stored twice"
        if (out / "run.json").is_file():
            try:
                check_run_folder(out)  # either a consistent run or a refusal, never a mix
            except ValueError as err:
                assert "rerun the same `mmlens flow` command" in str(err)
    assert caught_writing >= 2, "no kill landed while a table was written"
    run(out)
    assert_same_run(out, reference)
