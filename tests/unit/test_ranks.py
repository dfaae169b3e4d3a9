"""A data-parallel rank whose peer died says so in one line instead of gloo's traceback."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RANK = """
import datetime, os, sys
import torch.distributed as dist
from mmlens.core.errors import MMLensError
from mmlens.experiments.runfolder.distributed import Ranks

rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=60))
if rank == 0:
    os._exit(3)  # rank 0 dies
try:
    Ranks(rank=1, world=2).gather("rows")
except MMLensError as err:  # the command line prints these as one line
    print(f"{type(err).__name__}: {err}")
"""


def test_the_surviving_rank_names_what_happened_and_how_to_resume(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    store = tmp_path / "rendezvous"
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(rank), str(store)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    try:
        outputs = [rank.communicate(timeout=120) for rank in ranks]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
    assert ranks[0].returncode == 3
    out, err = outputs[1]
    assert ranks[1].returncode == 0, err[-2000:]
    assert out.startswith("RankLostError: rank 1 of 2: another rank stopped while this one waited "
                          "for the other ranks' results (")
    assert "run the same launcher command again to resume" in out
