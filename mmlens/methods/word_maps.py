"""A causal image map for each word of a text span (the question by default), over a grid of
image tokens: what the explorers (``report.html``, ``mmlens.plotting.explore``) show when a
word is picked.

    words = span_words(model, batch)                 # [("Is", tensor([98])), ("the", ...), ...]
    maps = word_maps(model, batch, layers=window_layers(3, 3, model.cfg.n_layers))
    maps[2]["values"]                                # one value per image token of the grid

A word is the tokens from one word-start piece (a leading ``Ġ`` / ``▁`` / space) to the next;
a tokenizer without such marks (the bundled word tokenizer) gives one word per token. Each
word's map equals ``causal_map(dst=<the word's positions>)`` with one region per grid token;
``window_word_maps`` computes every word's map in several windows from one clean run, the
variants (word x window x grid token) resumed ``batch_size`` at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mmlens.core.errors import MMLensError
from mmlens.inputs.batch import MultimodalBatch
from mmlens.methods.causal_map import blocked_probs, causal_map
from mmlens.methods.clean_run import clean_run, single_example
from mmlens.methods.knockout import _check_layers
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
              batch_size: int = 64) -> list[dict[str, Any]]:
    """One entry per word of ``span``: ``word``, ``positions`` (in ``batch``), ``values`` (the
    relative change of the clean top token's probability when the word's attention to each
    token of ``grid`` is blocked in ``layers``; one per grid token, in ``grid``'s order),
    ``p_base``. ``grid``: image-token positions (a view's row-major grid); default every
    image token of the example. ``window_word_maps`` with one window and one span."""
    return [{k: v for k, v in entry.items() if k != "span"}
            for entry in window_word_maps(model, batch, [layers], grid=grid, spans=(span,),
                                          example=example, batch_size=batch_size)[0]]


@torch.no_grad()
def window_word_maps(model: HookedModel, batch: MultimodalBatch,
                     windows: Sequence[Sequence[int]], *, grid: Tensor | None = None,
                     spans: Sequence[str] = ("question",), example: int = 0,
                     batch_size: int = 64) -> list[list[dict[str, Any]]]:
    """``word_maps`` of every word of each span in ``spans`` (span after span, each entry
    with its ``span``) in each of ``windows`` (one list per window): every word x window x
    grid token variant from one clean run, ``batch_size`` variants per resumed forward
    (``causal_map.blocked_probs``); the same numbers as one ``causal_map`` per word and
    window."""
    windows = [_check_layers(layers, model.cfg.n_layers, "language") for layers in windows]
    if not windows or not all(windows):
        raise MMLensError("each window needs layers: give windows as window_layers(...) lists")
    one = single_example(batch, example)
    offset = batch.input_ids.shape[1] - one.input_ids.shape[1]
    if model.cfg.text.cross_attention_layers:  # the image tokens are keys: no padding shift
        return _key_word_maps(model, batch, one, windows, grid, spans, example, batch_size)
    image = batch.positions("image", example)
    grid = image if grid is None else torch.as_tensor(grid).reshape(-1).to(image.device)
    if len(grid) == 0:
        raise MMLensError(f"the grid is empty: give image-token positions of example {example}")
    outside = grid[~torch.isin(grid, image)]
    if len(outside):
        raise MMLensError(f"grid position {int(outside[0])} is not an image token of example "
                          f"{example}: give image-token positions (batch.positions('image'))")
    words = [(span, word, positions) for span in spans
             for word, positions in span_words(model, batch, span, example)]
    clean = clean_run(model, one)
    token = clean.prediction()
    p_base = clean.prob(token)
    probs = blocked_probs(model, clean, [p.reshape(1).cpu() - offset for p in grid],
                          [((positions - offset).cpu(), layers)
                           for layers in windows for _, _, positions in words],
                          token, batch_size).reshape(len(windows), len(words), len(grid))

    def relative(p: float) -> float:  # a token the clean run gives no mass has no change
        return round((p - p_base) / p_base, 6) if p_base > 0 else float("nan")

    return [[{"word": word, "positions": positions.tolist(), "span": span,
              "values": [relative(float(p)) for p in per_grid], "p_base": p_base}
             for (span, word, positions), per_grid in zip(words, per_window, strict=True)]
            for per_window in probs]


def _key_word_maps(model: HookedModel, batch: MultimodalBatch, one: MultimodalBatch,
                   windows: Sequence[Sequence[int]], grid: Tensor | None,
                   spans: Sequence[str], example: int,
                   batch_size: int) -> list[list[dict[str, Any]]]:
    """``window_word_maps`` on a model that reads its image by cross-attention: ``grid``
    holds image key indices (default every key made from pixels: the tiles' patches), one
    ``causal_map`` per word and window (its cross-attention path)."""
    if not batch.token_maps:
        raise MMLensError("word maps on a model that reads its image by cross-attention need a "
                          "batch built by model.prepare (its image-token map)")
    token_map = batch.token_maps[example][0]
    keys = token_map.sees_pixels().nonzero().flatten()
    grid = keys if grid is None else torch.as_tensor(grid).reshape(-1).cpu()
    if len(grid) == 0:
        raise MMLensError(f"the grid is empty: give image key indices of example {example}")
    outside = grid[(grid < 0) | (grid >= len(token_map))]
    if len(outside):
        raise MMLensError(f"grid index {int(outside[0])} is not an image key of example "
                          f"{example}: give indices below {len(token_map)}")
    offset = batch.input_ids.shape[1] - one.input_ids.shape[1]
    regions = {str(i): [grid[i:i + 1]] for i in range(len(grid))}
    words = [(span, word, positions) for span in spans
             for word, positions in span_words(model, batch, span, example)]
    out = []
    for layers in windows:
        entries = []
        for span, word, positions in words:
            frame = causal_map(model, one, dst=[positions - offset], layers=list(layers),
                               regions=regions, images=[token_map.image_size],
                               batch_size=batch_size)
            entries.append({"word": word, "positions": positions.tolist(), "span": span,
                            "values": [round(float(v), 6) for v in frame["value"]],
                            "p_base": float(frame["p_base"].iloc[0])})
        out.append(entries)
    return out
