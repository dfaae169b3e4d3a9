"""A key/value cache for the language stack: resume a run from cached earlier positions."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mmlens.model.components.attention import KeyValue


@dataclass
class KeyValueCache:
    """Rotated keys and values per layer, each ``[batch, n_kv_heads, pos, d_head]``.

    ``attention_mask`` ``[batch, pos]`` marks the cached positions that are real (not padding).
    A ``frozen`` cache is read but never extended: many runs can resume from the same prefix
    (the information-flow sweep uses this); an unfrozen one grows with each forward
    (generation). ``position_ids`` are the decoder positions of the cached tokens as the
    family computed them (``[batch, pos]``; M-RoPE families keep their own leading axes), so a
    continuation can go on from them.
    """

    layers: list[KeyValue | None]
    attention_mask: Tensor | None = None
    frozen: bool = False
    position_ids: Tensor | None = None
    cross: Any = None
    """What cross-attention layers attend to (``CrossAttentionInputs``: the image keys, the
    cached rows' mask; Llama-3.2-Vision), kept for the positions that follow; None without."""

    @classmethod
    def empty(cls, n_layers: int) -> KeyValueCache:
        return cls(layers=[None] * n_layers)

    @property
    def length(self) -> int:
        first = next((kv for kv in self.layers if kv is not None), None)
        return 0 if first is None else first[0].shape[2]

    def update(self, layer: int, present: KeyValue | None) -> None:
        """Store a layer's keys and values (None: a cross-attention layer, nothing cached)."""
        if not self.frozen:
            self.layers[layer] = present

    def extend_mask(self, new_mask: Tensor) -> Tensor:
        """The mask over cached + new positions; stored unless frozen."""
        if self.attention_mask is None:
            past = torch.ones(new_mask.shape[0], self.length, dtype=new_mask.dtype,
                              device=new_mask.device)
        else:
            past = self.attention_mask.to(new_mask.device, new_mask.dtype)
        full = torch.cat([past, new_mask], dim=1)
        if not self.frozen:
            self.attention_mask = full
        return full

    def record_positions(self, position_ids: Tensor) -> None:
        """Append the new positions' ids (last axis = positions); nothing when frozen."""
        if self.frozen:
            return
        self.position_ids = position_ids if self.position_ids is None else torch.cat(
            [self.position_ids, position_ids.to(self.position_ids.device)], dim=-1)

    def expand(self, batch: int) -> KeyValueCache:
        """A frozen view of a batch-1 cache repeated ``batch`` times (no copy)."""
        layers = [
            None if kv is None
            else (kv[0].expand(batch, -1, -1, -1), kv[1].expand(batch, -1, -1, -1))
            for kv in self.layers
        ]
        mask = None if self.attention_mask is None else self.attention_mask.expand(batch, -1)
        positions = self.position_ids
        if positions is not None:
            positions = positions.expand(*positions.shape[:-2], batch, positions.shape[-1])
        cross = None if self.cross is None else self.cross.expand(batch)
        return KeyValueCache(layers=layers, attention_mask=mask, frozen=True,
                             position_ids=positions, cross=cross)

    def tile(self, copies: int) -> KeyValueCache:
        """A frozen cache of ``copies`` copies of the whole batch stacked (``[copy0 rows,
        copy1 rows, ...]``); a batch-1 cache is expanded without a copy."""
        if self.length and self.layers[0] is not None and self.layers[0][0].shape[0] == 1:
            return self.expand(copies)

        def stack(tensor: Tensor | None) -> Tensor | None:
            if tensor is None:
                return None
            return tensor.repeat(*[1] * (tensor.ndim - 2), copies, 1) if tensor.ndim < 4 \
                else tensor.repeat(copies, 1, 1, 1)

        layers = [None if kv is None else (stack(kv[0]), stack(kv[1])) for kv in self.layers]
        cross = None if self.cross is None else dataclasses.replace(  # the image keys, per copy
            self.cross, states=self.cross.states.repeat(copies, 1, 1),
            mask=self.cross.mask.repeat(copies, 1, 1, 1), rows=self.cross.rows.repeat(copies, 1))
        return KeyValueCache(layers=layers, attention_mask=stack(self.attention_mask),
                             frozen=True, position_ids=stack(self.position_ids), cross=cross)

    def truncate(self, length: int) -> KeyValueCache:
        """A frozen cache of the first ``length`` positions."""
        layers = [None if kv is None else (kv[0][:, :, :length], kv[1][:, :, :length])
                  for kv in self.layers]
        mask = None if self.attention_mask is None else self.attention_mask[:, :length]
        positions = None if self.position_ids is None else self.position_ids[..., :length]
        # the cross-attention inputs keep every row: a resumed suffix reads its own rows
        return KeyValueCache(layers=layers, attention_mask=mask, frozen=True,
                             position_ids=positions, cross=self.cross)
