"""A run's options checked before anything loads (device, counts) and the CPU threads it runs on.

``mmlens flow``, ``mmlens hooks`` and ``run_study`` refuse a device torch cannot run here or a
count that is not a whole number, naming the flag, before a model or data set is loaded.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from numbers import Integral
from pathlib import Path
from typing import Any

import torch

from mmlens.core.errors import MMLensError


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block on ``threads`` CPU threads (None: unchanged), then restore the count."""
    check_count(threads, "threads", "--threads")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def check_count(value: Any, name: str, flag: str, *, least: int = 1) -> None:
    """Refuse ``value`` unless it is None or a whole number >= ``least``, naming the flag."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, Integral)
                              or value < least):
        raise MMLensError(f"{name}={value!r} ({flag}): give a whole number of at least {least}")


DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
"""The device types mmlens runs on (each where torch finds its backend)."""


def check_device(device: str | None) -> None:
    """Refuse a device torch cannot run here (unknown, or no such GPU), before any loading."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise MMLensError(f"--device {device!r} is not a device mmlens runs on: pass cpu, "
                          "cuda, cuda:N, mps or xpu")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but torch sees no CUDA GPU here: pass "
                         "--device cpu, or run where a GPU and a CUDA build of torch are")
    backend = {"mps": torch.backends.mps, "xpu": getattr(torch, "xpu", None)}.get(parsed.type)
    if parsed.type in ("mps", "xpu") and not (backend and backend.is_available()):
        raise MMLensError(f"--device {device} asked for, but torch has no {parsed.type} "
                          "backend here: pass --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and (
            parsed.index >= torch.cuda.device_count()):
        raise MMLensError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA "
                          f"GPU(s), numbered from 0: pass cuda:0 to "
                          f"cuda:{torch.cuda.device_count() - 1}")


def default_out_dir() -> Path:
    return Path("runs") / time.strftime("flow-%Y%m%d-%H%M%S")
