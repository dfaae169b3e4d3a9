"""Spans inside the vision tower: prompt positions of image features -> vision patch indices.

The vision tower runs one row per image (LLaVA-1.5) or per tile (LLaVA-NeXT: each image's base
tile, then its high-resolution tiles row by row), each ``[1 + n_patches]`` positions with the
CLS token at 0 and patch ``(r, c)`` at ``1 + r * grid + c``. An image feature in the prompt
comes from one such patch:

- LLaVA-1.5, ``"default"`` features: the k-th image position is patch index ``k + 1``;
  ``"full"`` features keep CLS, so the k-th image position is index ``k`` (0 = CLS).
- LLaVA-NeXT: the base features are the base tile's patches in order; each kept tile feature
  is patch ``(patch_row, patch_col)`` of tile ``1 + tile_row * n_tile_cols + tile_col``; the
  newline features are learned parameters that no patch produced and are left out.

- Qwen2-VL / Qwen2.5-VL: the tower runs one row ``[1, n_patches, d]`` holding every image of
  the batch, packed in ``image_grid_thw`` order, each image's patches in merge-block order
  (2x2 blocks row-major, then row-major inside a block), so patches ``4k .. 4k + 3`` of the
  row merge into the batch's k-th image token (examples in order, then positions). The mmlens
  tower keeps that order in every block: Qwen2.5-VL's window attention is a mask, not Hugging
  Face's window permutation, so ``vision.blocks.{l}.*`` see the processor's order.

``vision_positions`` returns one LongTensor per vision-tower row of the batch (``[]`` for a row
the span does not touch), the per-example form that ``ablate_positions`` and
``block_attention(tower="vision")`` take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor


@dataclass(frozen=True)
class VisionLayout:
    """What the mapping needs from the model: the CLS offset of image features, the number of
    vision positions a row (CLS + patches; None for packed patches), for LLaVA-NeXT the tile
    geometry, and for Qwen-VL's packed patches the patches merged into one image token."""

    cls_offset: int
    n_positions: int | None
    geometry: Any = None
    patches_per_token: int | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> VisionLayout | None:
        """The layout of a CLIP/SigLIP-style tower or of Qwen-VL's packed patches (a vision
        config with ``merge_size`` and no fixed ``n_patches``); None for any other tower."""
        if not hasattr(cfg.vision, "n_patches"):
            merge = getattr(cfg.vision, "merge_size", None)
            if merge is None:
                return None
            return cls(cls_offset=0, n_positions=None, patches_per_token=merge**2)
        geometry = None
        if cfg.is_anyres:
            from mmlens.inputs.tiling import AnyresGeometry

            geometry = AnyresGeometry.from_config(cfg)
        return cls(cls_offset=1 if cfg.feature_select_strategy == "default" else 0,
                   n_positions=cfg.vision.n_patches + 1, geometry=geometry)


def _feature_indices(batch: Any, name: str, index: int) -> Tensor:
    """Indices into example ``index``'s image positions of span ``name``'s positions."""
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


def vision_positions(batch: Any, name: str, layout: VisionLayout) -> list[Tensor]:
    """Vision-tower patch indices of span ``name``, one LongTensor per vision row."""
    if layout.patches_per_token is not None:
        return [packed_positions(batch, name, layout.patches_per_token)]
    if layout.geometry is None:
        if batch.pixel_values is not None and batch.pixel_values.shape[0] != len(batch):
            raise ValueError(f"the batch has {batch.pixel_values.shape[0]} images for "
                             f"{len(batch)} examples: spans map to the vision tower only with "
                             "one image per example")
        for i in range(len(batch)):
            n_image = len(batch.positions("image", i))
            if layout.n_positions is not None and n_image not in (layout.n_positions - 1,
                                                                  layout.n_positions):
                raise ValueError(
                    f"example {i} has {n_image} image tokens for {layout.n_positions - 1} vision "
                    "patches: its image tokens pool several patches each (Gemma 3), so spans do "
                    "not map to single vision positions; hook the projector (projector.*) instead")
        return [_feature_indices(batch, name, i) + layout.cls_offset for i in range(len(batch))]
    from mmlens.inputs.anyres_spans import image_position_map
    from mmlens.inputs.tiling import read_image_sizes

    geometry = layout.geometry
    rows: list[Tensor] = []
    for i, size in enumerate(read_image_sizes(batch.image_sizes, len(batch))):
        places = image_position_map(size, geometry)
        n_cols = geometry.tile_grid(size).cols
        per_tile: list[list[int]] = [[] for _ in range(geometry.n_tiles(size))]
        for k in _feature_indices(batch, name, i).tolist():
            place = places[k]
            if place.kind == "newline":
                continue  # a learned parameter: no patch of any tile produced it
            tile = 0 if place.kind == "base" else 1 + place.tile_row * n_cols + place.tile_col
            per_tile[tile].append(1 + place.patch_row * geometry.grid + place.patch_col)
        rows.extend(torch.tensor(sorted(p), dtype=torch.long) for p in per_tile)
    return rows


def packed_positions(batch: Any, name: str, per_token: int) -> Int[Tensor, " n"]:
    """Qwen-VL: indices into the packed patch row ``[1, n_patches, d]`` of span ``name``.

    The batch's image tokens, counted over examples in order, are the merged tokens of the
    packed images in order; token k merges patches ``per_token * k .. per_token * k +
    per_token - 1``. Raises when ``batch.image_sizes`` (``image_grid_thw [images, 3]``) does
    not account for every example's image tokens.
    """
    if batch.image_sizes is None:
        raise ValueError(f"span {name!r} cannot be mapped into the packed vision tower: the batch "
                         "has no image_grid_thw (image_sizes); build it with model.prepare")
    grid = torch.as_tensor(batch.image_sizes).reshape(-1, 3)
    counts = grid.prod(-1).tolist()
    if any(n % per_token for n in counts):
        raise ValueError(f"image_grid_thw {grid.tolist()} holds an image whose patches do not "
                         f"merge {per_token} at a time: was the batch built for this model?")
    starts = _token_starts(batch, [n // per_token for n in counts], grid.tolist())
    merged = torch.cat([_feature_indices(batch, name, i) + starts[i] for i in range(len(batch))])
    return (merged[:, None] * per_token + torch.arange(per_token)).flatten()


def _token_starts(batch: Any, tokens: list[int], grid: list[list[int]]) -> list[int]:
    """Index of each example's first image token among the batch's, checking that the images'
    token counts ``tokens`` (in order) add up to every example's image tokens."""
    starts, image, start = [], 0, 0
    for i in range(len(batch)):
        starts.append(start)
        need, have = len(batch.positions("image", i)), 0
        while have < need and image < len(tokens):
            have += tokens[image]
            image += 1
        if have != need:
            raise ValueError(
                f"example {i} has {need} image tokens but its images in image_grid_thw {grid} "
                f"merge into {have}: image_grid_thw must list every image of the batch in "
                "order (examples in order), as model.prepare builds it")
        start += need
    if image != len(tokens):
        raise ValueError(f"image_grid_thw {grid} lists {len(tokens)} images but the batch's "
                         f"image tokens use only {image}: is it the batch's own grid?")
    return starts
