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

``vision_positions`` returns one LongTensor per vision-tower row of the batch (``[]`` for a row
the span does not touch), the per-example form that ``ablate_positions`` and
``block_attention(tower="vision")`` take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class VisionLayout:
    """What the mapping needs from the model: the CLS offset of image features, the number of
    vision positions a row (CLS + patches) and, for LLaVA-NeXT, the tile geometry."""

    cls_offset: int
    n_positions: int
    geometry: Any = None

    @classmethod
    def from_config(cls, cfg: Any) -> VisionLayout | None:
        """The layout of a CLIP/SigLIP-style tower; None for towers spans do not map into yet
        (Qwen-VL's packed dynamic-resolution patches)."""
        if not hasattr(cfg.vision, "n_patches"):
            return None
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
    if layout.geometry is None:
        if batch.pixel_values is not None and batch.pixel_values.shape[0] != len(batch):
            raise ValueError(f"the batch has {batch.pixel_values.shape[0]} images for "
                             f"{len(batch)} examples: spans map to the vision tower only with "
                             "one image per example")
        return [_feature_indices(batch, name, i) + layout.cls_offset for i in range(len(batch))]
    from mmlens.inputs.anyres_spans import image_position_map
    from mmlens.inputs.tiling import image_sizes_list

    geometry = layout.geometry
    rows: list[Tensor] = []
    for i, (height, width) in enumerate(image_sizes_list(batch.image_sizes, len(batch))):
        places = image_position_map((width, height), geometry)
        n_cols = geometry.tile_grid((height, width))[1]
        per_tile: list[list[int]] = [[] for _ in range(geometry.n_tiles((height, width)))]
        for k in _feature_indices(batch, name, i).tolist():
            place = places[k]
            if place.kind == "newline":
                continue  # a learned parameter: no patch of any tile produced it
            tile = 0 if place.kind == "base" else 1 + place.tile_row * n_cols + place.tile_col
            per_tile[tile].append(1 + place.patch_row * geometry.grid + place.patch_col)
        rows.extend(torch.tensor(sorted(p), dtype=torch.long) for p in per_tile)
    return rows
