"""A causal image map for each word of a text span (the question by default), over a grid of
image tokens: what the explorers (``report.html``, ``mmlens.plotting.explore``) show when a
word is picked.

    words = span_words(model, batch)                 # [("Is", tensor([98])), ("the", ...), ...]
    maps = word_maps(model, batch, layers=window_layers(3, 3, model.cfg.n_layers))
    maps[2]["values"]                                # one value per image token of the grid

A word is the tokens from one word-start piece (a leading ``Ġ`` / ``▁`` / space) to the next;
a tokenizer without such marks (the bundled word tokenizer) gives one word per token. Each
word's map is ``causal_map(dst=<the word's positions>)`` with one region per grid token,
batched: one clean run and one resumed forward per ``batch_size`` regions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mmlens.core.errors import MMLensError
from mmlens.inputs.batch import MultimodalBatch
from mmlens.methods.causal_map import causal_map
from mmlens.methods.clean_run import single_example
from mmlens.model.protocol import HookedModel

WORD_START = ("Ġ", "▁", " ")


def span_words(model: HookedModel, batch: MultimodalBatch, span: str = "question",
               example: int = 0) -> list[tuple[str, Tensor]]:
    """The words of ``span`` in ``example``: ``(text, positions)`` in prompt order."""
    if model.tokenizer is None:
        raise MMLensError("span_words needs the model's tokenizer: load the model with its "
                          "processor (from_pretrained on a checkpoint folder that holds one)")
    positions = batch.positions(span, example)
    if len(positions) == 0:
        raise MMLensError(f"example {example} has an empty {span!r} span: no words to map")
    ids = batch.input_ids[example, positions]
    pieces = model.tokenizer.convert_ids_to_tokens(ids.tolist())
    marked = any(str(piece).startswith(WORD_START) for piece in pieces[1:])
    groups: list[list[int]] = []
    for index, piece in enumerate(pieces):
        if not groups or not marked or str(piece).startswith(WORD_START):
            groups.append([])
        groups[-1].append(index)
    return [(model.tokenizer.decode(ids[group].tolist()).strip(), positions[group])
            for group in groups]


def word_frames(model: HookedModel, batch: MultimodalBatch, layers: Sequence[int], *,
                span: str = "question", example: int = 0, words: Sequence[str] | None = None,
                regions: Any = None, image_size: Any = None,
                batch_size: int = 64) -> list[tuple[str, Tensor, Any]]:
    """``(word, positions, causal_map frame)`` per word of ``span`` in ``example`` (only those
    in ``words`` when given): the word's attention to each region (``regions`` as
    ``causal_map`` takes them, for the example on its own; default one region per image
    token) blocked in ``layers``."""
    one = single_example(batch, example)
    offset = batch.input_ids.shape[1] - one.input_ids.shape[1]
    images = None if image_size is None else [image_size]
    return [(word, positions,
             causal_map(model, one, dst=[positions - offset], layers=list(layers),
                        regions=regions, images=images, batch_size=batch_size))
            for word, positions in span_words(model, batch, span, example)
            if words is None or word in words]


def word_maps(model: HookedModel, batch: MultimodalBatch, layers: Sequence[int], *,
              grid: Tensor | None = None, span: str = "question", example: int = 0,
              image_size: Any = None, batch_size: int = 64) -> list[dict[str, Any]]:
    """One entry per word of ``span``: ``word``, ``positions`` (in ``batch``), ``values`` (the
    relative change of the clean top token's probability when the word's attention to each
    token of ``grid`` is blocked in ``layers``; one per grid token, in ``grid``'s order),
    ``p_base``.

    ``grid``: image-token positions (a view's row-major grid); default every image token of
    the example (on a model that reads its image by cross-attention: key indices, default
    every tile patch). ``image_size``: the original image (or ``(width, height)``), for the pixel
    boxes; default the example's record's image.
    """
    offset = batch.input_ids.shape[1] - int(batch.attention_mask[example].sum())
    if model.cfg.text.cross_attention_layers:  # the image tokens are keys: no padding shift
        offset = 0
        if grid is None:  # every key made from pixels (tile patches), from the image's map
            if not batch.token_maps:
                raise MMLensError("word_maps on a model that reads its image by "
                                  "cross-attention needs grid= (image key indices) or a batch "
                                  "built by model.prepare (its image-token map)")
            grid = batch.token_maps[example][0].sees_pixels().nonzero().flatten()
    grid = batch.positions("image", example) if grid is None else torch.as_tensor(grid)
    regions = {str(i): [(grid[i:i + 1] - offset).cpu()] for i in range(len(grid))}
    return [{"word": word, "positions": positions.tolist(),
             "values": [round(float(v), 6) for v in frame["value"]],
             "p_base": float(frame["p_base"].iloc[0])}
            for word, positions, frame in word_frames(
                model, batch, layers, span=span, example=example, regions=regions,
                image_size=image_size, batch_size=batch_size)]
