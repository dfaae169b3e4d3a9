"""How many knockout rows the fast engine can run together in the memory it has.

The engine runs one layer at a time for a batch of rows, each a suffix of ``q`` positions
attending to ``k`` keys (the cached prefix and the suffix). Per row and layer it holds the
residual stream in and out, queries/keys/values (rotated copies too), the keys and values
joined with the cache (and repeated for grouped-query heads), the attention mask and scores,
and the MLP's hidden activations; the last layer adds float32 logits. The batch is the
memory budget over that, with a safety factor of two.
"""

from __future__ import annotations

import os
import re

import torch

from mmlens.model.protocol import HookedModel

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str | int) -> int:
    """``"24GB"``, ``"512MiB"``, ``"2e9"`` or a number of bytes -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"memory {text!r} is not understood: write e.g. 24GB, 512MiB or a "
                         "number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: CUDA's own count, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil
    except ImportError:  # Linux without psutil: the kernel's count of free pages
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return psutil.virtual_memory().available


def bytes_per_row(cfg, q_len: int, k_len: int, dtype: torch.dtype) -> int:
    """Peak bytes one knockout row needs while a layer runs (see the module docstring)."""
    size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    heads, kv_heads, d_head = cfg.n_heads, cfg.n_key_value_heads, cfg.d_head
    elements = (
        2 * q_len * cfg.d_model  # residual in and out
        + 2 * q_len * (heads + 2 * kv_heads) * d_head  # q, k, v and their rotations
        + 2 * k_len * (kv_heads + heads) * d_head  # keys/values joined with the cache, repeated
        + 3 * heads * q_len * k_len  # scores and pattern (float32 softmax counts twice)
        + 3 * q_len * cfg.d_mlp  # gate, up, product
    )
    return 2 * (elements * size + q_len * k_len + 4 * cfg.d_vocab)  # mask bytes, logits


def auto_batch_size(model: HookedModel, q_len: int, k_len: int, *, n_rows: int,
                    max_memory: int | None = None) -> int:
    """Rows per batch that fit ``max_memory`` bytes, or 80% of the free memory of the device
    of the first decoder block; at least 1, at most ``n_rows``."""
    weight = model.blocks[0].attn.q_weight
    budget = max_memory if max_memory is not None else int(0.8 * free_memory(weight.device))
    per_row = bytes_per_row(model.cfg, q_len, k_len, weight.dtype)
    return max(1, min(n_rows, budget // per_row))
