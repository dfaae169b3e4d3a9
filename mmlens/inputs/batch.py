"""MultimodalBatch: model inputs plus named position spans per example."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from mmlens.core.errors import MMLensError


@dataclass
class MultimodalBatch:
    """Inputs for ``HookedMultimodalTransformer`` and where things are in them.

    ``input_ids`` / ``attention_mask`` ``[batch, pos]`` (left padded), ``pixel_values``
    ``[images, 3, H, W]`` (LLaVA-NeXT: ``[images, tiles, 3, H, W]`` with ``image_sizes``).
    ``token_maps[i]``: one ``ImageTokenMap`` per image of example ``i`` (what each image token
    is made from: tower patches, pixels; ``mmlens.inputs.token_map``), from ``image_layout``,
    the layout of the model's family.
    ``spans[i][name]`` is a sorted LongTensor of absolute positions in row ``i``: ``image``,
    ``question`` (the raw question's tokens only), ``last``, ``bos``, ``system``, ``suffix``
    (instruction after the question), ``text``, and any span added with ``add_span`` (e.g.
    ``related`` / ``other`` image patches). ``key_spans``: the names of spans that hold
    indices of the image's cross-attention keys instead of prompt positions (a family whose
    image is not in the prompt, ``ImageLayout.in_sequence`` False: Llama-3.2-Vision's
    ``related`` / ``other``); ``block_attention`` and the vision-tower spans read them as keys.
    """

    input_ids: Tensor
    attention_mask: Tensor
    pixel_values: Tensor | None
    spans: list[dict[str, Tensor]]
    image_sizes: Tensor | None = None
    prompts: list[str] = field(default_factory=list)
    examples: list[Any] | None = None
    tokenizer: Any = field(default=None, repr=False, compare=False)
    image_layout: Any = field(default=None, repr=False, compare=False)
    token_maps: list[list[Any]] | None = field(default=None, repr=False, compare=False)
    key_spans: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __repr__(self) -> str:
        pixels = "none" if self.pixel_values is None else list(self.pixel_values.shape)
        padding = int((self.attention_mask == 0).sum())
        return (f"MultimodalBatch({len(self)} examples x {self.input_ids.shape[1]} positions "
                f"({padding} padding), pixel_values {pixels}, spans: "
                f"{', '.join(self.span_names) or 'none'})")

    @property
    def str_tokens(self) -> list[list[str]]:
        """Every position of every example as a token string (padding included, so indices
        match ``spans``), as TransformerLens's ``to_str_tokens``."""
        if self.tokenizer is None:
            raise ValueError("this batch has no tokenizer: build it with model.prepare(...), or "
                             "use model.to_str_tokens(batch.input_ids[i])")
        return [decode_each(self.tokenizer, row) for row in self.input_ids]

    def vision_positions(self, name: str, model: Any = None) -> list[Tensor]:
        """Span ``name`` inside the vision tower: patch indices (0 = the class token on a tower
        with one: CLIP; SigLIP and Qwen-VL have none), one LongTensor per vision-tower row
        (LLaVA-1.5: per example; LLaVA-NeXT / OneVision: per tile, each image's base tile
        first; Qwen-VL: one row of every image's packed patches). Read off the batch's image
        maps (``mmlens.inputs.vision_spans``). ``model`` is needed only for a batch not built
        by ``model.prepare``."""
        from mmlens.inputs.vision_spans import vision_positions

        if any("image_0" in spans or not len(spans.get("image", [0])) for spans in self.spans):
            raise MMLensError(f"span {name!r} cannot be mapped into the vision tower: a prompt "
                              "of this batch has several images or none; vision-tower spans "
                              "need one image per prompt (give explicit patch indices)")
        layout = self.image_layout
        if model is not None:
            layout = model.family.image_layout(model)
        if layout is None:
            raise ValueError(f"span {name!r} cannot be mapped into the vision tower: the batch "
                             "was not built by model.prepare (pass model=), or the model's "
                             "family declares no image layout (Family.image_layout): give "
                             "explicit patch indices")
        return vision_positions(self, name, layout, self.token_maps)

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
            if name in ("related", "other"):
                hint = (" The related / other image patches come from object boxes: pass "
                        "boxes= to model.prepare (or use prepare_examples).")
            raise KeyError(f"unknown span {name!r}.{hint} This batch has spans: "
                           f"{', '.join(self.span_names)}; add your own with batch.add_span")
        return spans[name]

    def prompt_span(self, name: str, where: str) -> list[Tensor]:
        """``span(name)``, refused with a reason when it holds cross-attention keys instead of
        prompt positions (``key_spans``) and ``where`` (a method's name) reads positions."""
        if name in self.key_spans:
            raise MMLensError(
                f"{where}: span {name!r} holds the image's cross-attention keys, not positions "
                "of the prompt (the image is read by cross-attention): knock those keys out "
                "with block_attention, information_flow or causal_map, or use a text span")
        return self.span(name)

    def span(self, name: str) -> list[Tensor]:
        """Positions of span ``name`` for every example."""
        return [self.positions(name, i) for i in range(len(self))]

    def add_span(self, name: str, positions: Sequence[Sequence[int] | Tensor], *,
                 keys: int | None = None) -> None:
        """Name a set of positions per example (absolute positions in the padded batch);
        with ``keys``, indices of the ``keys`` cross-attention keys of each example's image
        instead (``key_spans``)."""
        if len(positions) != len(self):
            raise ValueError(f"add_span({name!r}) got positions for {len(positions)} examples "
                             f"but the batch has {len(self)}")
        seq_len = self.input_ids.shape[1] if keys is None else keys
        for i, pos in enumerate(positions):
            pos = torch.as_tensor(pos, dtype=torch.long).reshape(-1).unique(sorted=True)
            if len(pos) and (pos.min() < 0 or pos.max() >= seq_len):
                raise IndexError(f"span {name!r} of example {i} has "
                                 f"{'positions' if keys is None else 'image keys'} outside "
                                 f"0..{seq_len - 1}")
            self.spans[i][name] = pos
        self.key_spans = (self.key_spans | {name}) if keys is not None else (
            self.key_spans - {name})

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
            spans=[{k: v if k in self.key_spans else v - start
                    for k, v in self.spans[i].items()} for i in indices],
            prompts=[self.prompts[i] for i in indices] if self.prompts else [],
            examples=[self.examples[i] for i in indices] if self.examples else None,
            token_maps=None if self.token_maps is None else [self.token_maps[i]
                                                             for i in indices],
        )

    def to(self, device: str | torch.device) -> MultimodalBatch:
        def move(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor.to(device)

        return replace(self, input_ids=move(self.input_ids),
                       attention_mask=move(self.attention_mask),
                       pixel_values=move(self.pixel_values), image_sizes=move(self.image_sizes))


def decode_each(tokenizer: Any, tokens: Int[Tensor, " pos"]) -> list[str]:
    """One string per token, decoded on its own as TransformerLens does."""
    return tokenizer.batch_decode(torch.as_tensor(tokens).reshape(-1, 1),
                                  clean_up_tokenization_spaces=False)
