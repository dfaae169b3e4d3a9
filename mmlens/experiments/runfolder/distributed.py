"""Data-parallel runs: which examples this process computes, and waiting for the others.

    torchrun --nproc-per-node 4 -m mmlens.cli flow --device cuda ...
    accelerate launch -m mmlens.cli flow ...            # the same environment variables

Under a launcher (``WORLD_SIZE`` > 1 in the environment) ``init_ranks`` joins the
``torch.distributed`` group (NCCL on GPUs, gloo on the CPU); the examples still to do are dealt
out round robin, each to exactly one rank, and each rank appends to its own store shard
(``mmlens.experiments.runfolder.store``). Rank 0 waits for the others, then reads every
shard. Without a launcher everything here is the single process ``Ranks()``.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mmlens.core.errors import MMLensError
from mmlens.experiments.runfolder.store import shard_files

# Ranks wait for each other at the end of a sweep that can run for hours.
TIMEOUT = datetime.timedelta(hours=12)


class RankLostError(MMLensError):
    """Another rank of a data-parallel run stopped while this one waited for it."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run (``rank`` of ``world``)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            self._together("the other ranks (barrier)", dist.barrier)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (on every rank)."""
        if self.world == 1:
            return [value]
        values: list[Any] = [None] * self.world
        self._together("the other ranks' results", lambda: dist.all_gather_object(values, value))
        return values

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        box = [value]
        self._together("rank 0's decision", lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def _together(self, what: str, collective: Any) -> None:
        """Run a collective; a rank that died (gloo and NCCL raise ``RuntimeError``) becomes
        one clear error instead of the backend's traceback."""
        try:
            collective()
        except RuntimeError as err:
            cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RankLostError(
                f"rank {self.rank} of {self.world}: another rank stopped while this one waited "
                f"for {what} ({cause}); this rank's finished examples are kept in its store "
                "shard: read the other ranks' logs, then run the same launcher command again "
                "to resume") from err

    def mine(self, indices: Sequence[int]) -> list[int]:
        """This rank's share of ``indices``: every ``world``-th one, starting at ``rank``."""
        return list(indices[self.rank::self.world])


def current_ranks() -> Ranks:
    """The process group already joined, or a single process."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(),
                     int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return Ranks()


def init_ranks(device: str | None) -> Ranks:
    """Join the launcher's process group (if ``WORLD_SIZE`` > 1) and return this rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return current_ranks()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE is set but this torch has no torch.distributed: run "
                           "one process, or install a torch build with distributed support")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = device is not None and str(device).startswith("cuda")
    if on_gpu:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if on_gpu else "gloo", timeout=TIMEOUT)
    return current_ranks()


def rank_device(device: str | None, ranks: Ranks) -> str | None:
    """``cuda`` becomes this rank's GPU, ``cuda:{LOCAL_RANK}``, when several ranks run."""
    if ranks.world > 1 and device == "cuda":
        return f"cuda:{ranks.local_rank}"
    return device


def close_ranks(ranks: Ranks) -> None:
    if ranks.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


class StoreProgress:
    """Records other ranks have appended to their shards since the last call, counted by
    reading only the new bytes, so rank 0's one progress bar can show the whole run."""

    def __init__(self, store: str | Path, own: Path):
        self.store, self.own = Path(store), own
        self.offsets = {file: file.stat().st_size for file in shard_files(store)}

    def new_records(self) -> int:
        count = 0
        for file in shard_files(self.store):
            if file == self.own:
                continue
            start = self.offsets.get(file, 0)
            with open(file, "rb") as handle:
                handle.seek(start)
                data = handle.read()
            complete = data.rfind(b"\n") + 1  # a line being written is counted once it ends
            count += data[:complete].count(b"\n") - (1 if start == 0 and complete else 0)
            self.offsets[file] = start + complete
        return count
