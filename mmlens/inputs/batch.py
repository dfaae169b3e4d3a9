"""MultimodalBatch: model inputs plus named position spans per example."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor


@dataclass
class MultimodalBatch:
    """Inputs for ``HookedMultimodalTransformer`` and where things are in them.

    ``input_ids`` / ``attention_mask`` ``[batch, pos]`` (left padded), ``pixel_values``
    ``[images, 3, H, W]`` (LLaVA-NeXT: ``[images, tiles, 3, H, W]`` with ``image_sizes``).
    ``spans[i][name]`` is a sorted LongTensor of absolute positions in row ``i``: ``image``,
    ``question`` (the raw question's tokens only), ``last``, ``bos``, ``system``, ``suffix``
    (instruction after the question), ``text``, and any span added with ``add_span`` (e.g.
    ``related`` / ``other`` image patches).
    """

    input_ids: Tensor
    attention_mask: Tensor
    pixel_values: Tensor | None
    spans: list[dict[str, Tensor]]
    image_sizes: Tensor | None = None
    prompts: list[str] = field(default_factory=list)
    examples: list[Any] | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def span_names(self) -> list[str]:
        return sorted(set().union(*(s.keys() for s in self.spans))) if self.spans else []

    def positions(self, name: str, index: int) -> Tensor:
        """Positions of span ``name`` in example ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} is outside this batch of {len(self)}")
        spans = self.spans[index]
        if name not in spans:
            close = difflib.get_close_matches(name, self.span_names, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"unknown span {name!r}.{hint} This batch has spans: "
                           f"{', '.join(self.span_names)}; add your own with batch.add_span")
        return spans[name]

    def span(self, name: str) -> list[Tensor]:
        """Positions of span ``name`` for every example."""
        return [self.positions(name, i) for i in range(len(self))]

    def add_span(self, name: str, positions: Sequence[Sequence[int] | Tensor]) -> None:
        """Name a set of positions per example (absolute positions in the padded batch)."""
        if len(positions) != len(self):
            raise ValueError(f"add_span({name!r}) got positions for {len(positions)} examples "
                             f"but the batch has {len(self)}")
        seq_len = self.input_ids.shape[1]
        for i, pos in enumerate(positions):
            pos = torch.as_tensor(pos, dtype=torch.long).reshape(-1).unique(sorted=True)
            if len(pos) and (pos.min() < 0 or pos.max() >= seq_len):
                raise IndexError(f"span {name!r} of example {i} has positions outside "
                                 f"0..{seq_len - 1}")
            self.spans[i][name] = pos

    def select(self, indices: int | Sequence[int]) -> MultimodalBatch:
        """A sub-batch, padding trimmed, spans shifted to match."""
        indices = [indices] if isinstance(indices, int) else list(indices)
        mask = self.attention_mask[indices]
        start = int((mask.cumsum(-1) == 0).sum(-1).min())  # common left padding to drop
        pixel_values = self.pixel_values
        if pixel_values is not None:
            pixel_values = pixel_values[indices]
        return replace(
            self,
            input_ids=self.input_ids[indices, start:],
            attention_mask=mask[:, start:],
            pixel_values=pixel_values,
            image_sizes=None if self.image_sizes is None else self.image_sizes[indices],
            spans=[{k: v - start for k, v in self.spans[i].items()} for i in indices],
            prompts=[self.prompts[i] for i in indices] if self.prompts else [],
            examples=[self.examples[i] for i in indices] if self.examples else None,
        )

    def to(self, device: str | torch.device) -> MultimodalBatch:
        def move(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor.to(device)

        return replace(self, input_ids=move(self.input_ids),
                       attention_mask=move(self.attention_mask),
                       pixel_values=move(self.pixel_values), image_sizes=move(self.image_sizes))
