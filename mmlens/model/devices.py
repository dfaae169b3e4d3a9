"""Placing one model across several devices: a device map, and activations that follow it.

A device map names the model's top-level parts and decoder blocks::

    {"vision": "cuda:0", "projector": "cuda:0", "embed": "cuda:0",
     "blocks.0-15": "cuda:0", "blocks.16-31": "cuda:1", "ln_final": "cuda:1",
     "unembed": "cuda:1"}

Parts left out stay where they are (``anyres`` follows ``projector`` unless named). ``"auto"``
spreads the decoder blocks over the visible GPUs in contiguous runs of about equal size (the
image side and the embedding on the first, the final norm and unembedding on the last), or
leaves everything on the CPU when there is no GPU.

Each placed part gets a forward pre-hook that moves its tensor inputs to its device, so the
residual stream enters every block on that block's device and every hook point sees it there:
hooks stay on the data path. A model on one device gets no such hook and runs as before.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

DeviceMap = Mapping[str, str | int | torch.device]

_BLOCKS = re.compile(r"^blocks\.(\d+)(?:-(\d+))?$")


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    return value


def _mover(device: torch.device):
    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _to(args, device), {k: _to(v, device) for k, v in kwargs.items()}

    return pre_hook


def auto_device_map(model: nn.Module) -> dict[str, str]:
    """Blocks in equal contiguous runs over the visible GPUs; the CPU when there is none."""
    n_gpus = torch.cuda.device_count()
    names = [name for name, _ in model.named_children() if name != "blocks"]
    if n_gpus == 0:
        return {name: "cpu" for name in names} | {f"blocks.0-{len(model.blocks) - 1}": "cpu"}
    n_layers = len(model.blocks)
    per_gpu = -(-n_layers // n_gpus)
    placement: dict[str, str] = {}
    for gpu in range(n_gpus):
        first, last = gpu * per_gpu, min(n_layers, (gpu + 1) * per_gpu) - 1
        if first <= last:
            placement[f"blocks.{first}-{last}"] = f"cuda:{gpu}"
    last_gpu = f"cuda:{min(n_gpus, -(-n_layers // per_gpu)) - 1}"
    for name in names:
        placement[name] = last_gpu if name in ("ln_final", "unembed") else "cuda:0"
    return placement


def resolve_device_map(model: nn.Module, device_map: DeviceMap | str) -> dict[str, torch.device]:
    """``{module name: device}`` for every top-level part and every decoder block.

    Raises naming the entry that is not a part of this model or a block range it lacks.
    """
    if isinstance(device_map, str):
        if device_map != "auto":
            raise ValueError(f"device_map {device_map!r} is not understood: pass 'auto' or a "
                             "dict such as {'vision': 'cuda:0', 'blocks.0-15': 'cuda:0', "
                             "'blocks.16-31': 'cuda:1'}")
        device_map = auto_device_map(model)
    parts = {name for name, _ in model.named_children() if name != "blocks"}
    n_layers = len(model.blocks)
    placement: dict[str, torch.device] = {}
    for key, device in device_map.items():
        device = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
        match = _BLOCKS.match(key)
        if match:
            first = int(match.group(1))
            last = int(match.group(2)) if match.group(2) is not None else first
            if not 0 <= first <= last < n_layers:
                raise ValueError(f"device_map entry {key!r}: the model has blocks 0-"
                                 f"{n_layers - 1}; write blocks.A-B with A <= B")
            for layer in range(first, last + 1):
                placement[f"blocks.{layer}"] = device
        elif key in parts:
            placement[key] = device
        else:
            raise ValueError(f"device_map entry {key!r} is not a part of this model: use "
                             f"{', '.join(sorted(parts))} or blocks.A-B (0-{n_layers - 1})")
    if "anyres" in parts and "anyres" not in placement and "projector" in placement:
        placement["anyres"] = placement["projector"]
    return placement


def dispatch(model: nn.Module, device_map: DeviceMap | str) -> dict[str, torch.device]:
    """Move each part to its device and make its inputs follow it; returns the placement."""
    placement = resolve_device_map(model, device_map)
    # Every part follows its device once the model spans several, placed or not.
    for name, module in [*model.named_children(), *((f"blocks.{i}", block)
                                                     for i, block in enumerate(model.blocks))]:
        if name != "blocks" and name not in placement:
            weight = next(module.parameters(), None)
            if weight is not None:
                placement[name] = weight.device
    for name, device in placement.items():
        module = model.get_submodule(name)
        module.to(device)
        handle = getattr(module, "_mmlens_device_hook", None)
        if handle is not None:
            handle.remove()
        module._mmlens_device_hook = module.register_forward_pre_hook(
            _mover(device), with_kwargs=True)
    model.device_map = {name: str(device) for name, device in placement.items()}
    return placement
