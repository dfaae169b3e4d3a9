"""Blocked attention edges: the one primitive behind ``block_attention`` and the sweep engine.

An edge is a (query, key) pair of positions. ``blocked_edges`` marks, per row, every edge from
a target (query) to a source (key); ``check_attendable`` refuses a mask that leaves some query
with no key at all, whose softmax would be undefined.

With a key/value cache the queries of a run are the last ``q_len`` of its ``k_len`` keys, so
query position ``p`` sits at row ``p - (k_len - q_len)`` of the mask. Positions outside the
run (a target already in the cache, a source past the last key) are skipped: those edges are
not in this run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool
from torch import Tensor


def blocked_edges(
    sources: Sequence[Tensor], targets: Sequence[Tensor], q_len: int, k_len: int,
    device: torch.device | str | None = None,
) -> Bool[Tensor, "rows q_pos k_pos"]:
    """True at every (target query, source key) edge, one row per ``(sources[i], targets[i])``.

    ``sources[i]`` / ``targets[i]`` are absolute positions ``[n]`` (LongTensors); the result is
    ``[len(sources), q_len, k_len]`` in the mask's coordinates (queries = the last ``q_len``
    keys).
    """
    if len(sources) != len(targets):
        raise ValueError(f"got {len(sources)} source lists but {len(targets)} target lists: "
                         "give one of each per row")
    first_query = k_len - q_len
    blocked = torch.zeros(len(sources), q_len, k_len, dtype=torch.bool, device=device)
    for row, (keys, queries) in enumerate(zip(sources, targets, strict=True)):
        keys = keys[(keys >= 0) & (keys < k_len)].to(blocked.device)
        queries = queries[(queries >= first_query) & (queries < k_len)].to(blocked.device)
        if len(keys) and len(queries):
            blocked[row, (queries - first_query)[:, None], keys[None, :]] = True
    return blocked


def check_attendable(
    allowed: Bool[Tensor, "rows heads q_pos k_pos"], first_query: int, where: str,
    row_name: str = "example",
) -> None:
    """Raise when a query of ``allowed`` ("may attend" mask) is left with no key.

    ``first_query``: the absolute position of the mask's first query row; ``where`` and
    ``row_name`` say in the message which hook / knockout and which kind of row it is.
    """
    empty = ~allowed.any(-1)
    if bool(empty.any()):
        row, head, query = (int(i) for i in empty.nonzero()[0])
        raise ValueError(
            f"{where}: position {first_query + query} of {row_name} {row} (head {head}) would "
            "attend to nothing after the block; keep at least one key it may attend to (e.g. "
            "leave it out of the targets, or keep a source that does not cover every earlier "
            "position and itself)")
