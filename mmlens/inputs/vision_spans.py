"""Spans inside the vision tower: prompt positions of image tokens -> vision patch indices.

Every image token's tower patches come from its image's map (``mmlens.inputs.token_map``):
``(tile, index)`` pairs, the class-token offset included (1 on CLIP, whose rows start with the
class token; 0 on SigLIP and Qwen-VL). The tower rows of a batch are its examples' images in
order, each image's tiles in order (LLaVA-1.5: one row an image; LLaVA-NeXT / OneVision: the
base tile, then the tiles row by row); on a packed tower (Qwen-VL) every image of the batch is
one row ``[1, n_patches, d]`` and an image's indices count on from the patches of the images
before it. A newline token is a learned parameter no patch produced and maps to nothing.

``vision_positions`` returns one LongTensor per vision-tower row of the batch (``[]`` for a row
the span does not touch), the per-example form that ``ablate_positions`` and
``block_attention(tower="vision")`` take.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mmlens.inputs.token_map import ImageLayout, ImageTokenMap


def _feature_indices(batch: Any, name: str, index: int, layout: ImageLayout,
                     n_tokens: int) -> Tensor:
    """Indices into example ``index``'s image positions of span ``name``'s positions (where
    the image is not in the prompt: its cross-attention keys, ``n_tokens`` of them, which a
    key span holds directly and ``image`` names all of)."""
    if not layout.in_sequence:
        if name == "image":
            return torch.arange(n_tokens)
        if name not in batch.key_spans:
            raise ValueError(f"span {name!r} of example {index} holds prompt positions, but "
                             "this model's image is not in the prompt: use a span over its "
                             "cross-attention keys (image, related, other) on vision hooks")
        return batch.positions(name, index)
    positions = batch.positions(name, index)
    image = batch.positions("image", index)
    is_image = torch.isin(positions, image)
    if not bool(is_image.all()):
        bad = int(positions[~is_image][0])
        raise ValueError(
            f"span {name!r} of example {index} holds position {bad}, which is not an image "
            "position, so it has no place on the vision tower; use a span of image positions "
            "(image, related, other, ...) on vision hooks")
    return torch.searchsorted(image, positions)


def vision_positions(batch: Any, name: str, layout: ImageLayout,
                     maps: Sequence[Sequence[ImageTokenMap]] | None = None) -> list[Tensor]:
    """Vision-tower patch indices of span ``name``, one LongTensor per vision row.

    ``maps``: each example's image maps (``batch.token_maps``); read off the model inputs
    (``layout.input_maps``) when None, and always on a packed tower, whose one row is laid out
    by ``batch.image_sizes`` (``image_grid_thw``), which is checked against the image tokens.
    """
    if maps is None or layout.packed:
        maps = layout.input_maps(batch)
    rows: list[Tensor] = []
    packed: list[int] = []
    offset = 0
    for i, example_maps in enumerate(maps):
        tokens = _feature_indices(batch, name, i, layout,
                                  sum(len(m) for m in example_maps)).tolist()
        start = 0
        for token_map in example_maps:
            local = [k - start for k in tokens if start <= k < start + len(token_map)]
            per_tile = token_map.tower_positions(local)
            if token_map.packed:
                packed.extend(offset + p for p in per_tile[0])
                offset += token_map.tower_length
            else:
                rows.extend(torch.tensor(p, dtype=torch.long) for p in per_tile)
            start += len(token_map)
    return [torch.tensor(packed, dtype=torch.long)] if layout.packed else rows


def images_of_examples(batch: Any, maps: list[ImageTokenMap]) -> list[list[ImageTokenMap]]:
    """Give the batch's image maps, in order, to its examples by their image tokens; raises
    when the maps (from ``image_grid_thw``) do not account for every example's tokens."""
    grid = [] if batch.image_sizes is None else torch.as_tensor(batch.image_sizes).reshape(
        len(maps), -1).tolist()
    out, image = [], 0
    for i in range(len(batch)):
        need, have, mine = len(batch.positions("image", i)), 0, []
        while have < need and image < len(maps):
            mine.append(maps[image])
            have += len(maps[image])
            image += 1
        if have != need:
            raise ValueError(
                f"example {i} has {need} image tokens but its images in image_grid_thw {grid} "
                f"merge into {have}: image_grid_thw must list every image of the batch in "
                "order (examples in order), as model.prepare builds it")
        out.append(mine)
    if image != len(maps):
        raise ValueError(f"image_grid_thw {grid} lists {len(maps)} images but the batch's "
                         f"image tokens use only {image}: is it the batch's own grid?")
    return out
