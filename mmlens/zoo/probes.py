"""Training-only targets and probes of shapes-llava: what the image pathway is taught.

``patch_labels`` names the object under each image patch; ``object_labels`` the attributes of
one object; ``Probes`` reads them back, linearly, from the projected image tokens and from the
residual stream at the words naming an object. The probes are trained alongside the model by
``mmlens.zoo.train`` and are not saved with it.
"""

from __future__ import annotations

import numpy as np
import torch

from mmlens.data.shapes import COLORS, SHAPES, SIZES, object_mask

ATTRIBUTES = {"shape": (None, *SHAPES), "color": (None, *COLORS), "size": (None, *SIZES)}
"""Classes of the training-only probes; class 0 is "no object" (patches) or unused."""
SIDES = ("left", "right")
IGNORE = -100


def object_labels(obj, image_size: int) -> tuple[int, int, int, int]:
    """``(shape, color, size, side)`` class indices of one object (side of its centre)."""
    side = int(2 * obj.x + obj.w > image_size)
    return (*(ATTRIBUTES[a].index(getattr(obj, a)) for a in ATTRIBUTES), side)


def patch_labels(example, image_size: int, patch: int, min_pixels: int = 20) -> torch.Tensor:
    """``[n_patches, 3]`` (shape, color, size) of the object covering most of each patch.

    A patch with fewer than ``min_pixels`` pixels of any object is labelled 0 ("no object").
    """
    mask = np.array(object_mask(example.objects, image_size), dtype=np.int64)
    grid = image_size // patch
    cells = mask[: grid * patch, : grid * patch].reshape(grid, patch, grid, patch)
    cells = cells.transpose(0, 2, 1, 3).reshape(grid * grid, patch * patch)
    n = len(example.objects)
    counts = np.stack([(cells == k + 1).sum(1) for k in range(n)], 1)  # [patches, objects]
    best = counts.argmax(1)
    table = np.array(
        [[0, 0, 0]] + [object_labels(o, image_size)[:3] for o in example.objects], dtype=np.int64
    )
    covered = counts[np.arange(len(best)), best] >= min_pixels
    return torch.from_numpy(table[np.where(covered, best + 1, 0)])


class Probes(torch.nn.Module):
    """Training-only linear read-outs that give the image pathway a dense signal.

    ``patch``: the projected image token of each patch -> shape, colour and size of the object
    covering it (or "no object"), and the patch's row and column. ``mention``: the residual
    stream at the last word of each phrase naming an object -> that object's shape, colour,
    size and side, and whether it exists in the scene. They are not part of the saved model.
    """

    def __init__(self, width: int, grid: int):
        super().__init__()
        sizes = [len(v) for v in ATTRIBUTES.values()]
        self.grid = grid
        self.patch = torch.nn.Linear(width, sum(sizes) + 2 * grid)
        self.mention = torch.nn.Linear(width, sum(sizes) + len(SIDES) + 2)
        self.patch_sizes = [*sizes, grid, grid]
        self.mention_sizes = [*sizes, len(SIDES), 2]

    def loss(self, image_tokens, hidden, batch: dict) -> torch.Tensor:
        device = image_tokens.device
        n = self.grid * self.grid
        position = torch.arange(n, device=device)
        rows, cols = (
            (position // self.grid).expand(len(image_tokens), n),
            (position % self.grid).expand(len(image_tokens), n),
        )
        targets = [*batch["patches"].to(device).unbind(-1), rows, cols]
        chunks = self.patch(image_tokens).split(self.patch_sizes, dim=-1)
        total = sum(
            torch.nn.functional.cross_entropy(c.flatten(0, 1), t.flatten())
            for c, t in zip(chunks, targets, strict=True)
        ) / len(targets)
        mentions = batch["mentions"].to(device).flatten(0, 1)  # [B * 2, 5]
        keep = mentions[:, 0] >= 0
        if keep.any():
            which = torch.arange(len(hidden), device=device).repeat_interleave(2)[keep]
            states = hidden[which, mentions[keep, 0]]
            chunks = self.mention(states).split(self.mention_sizes, dim=-1)
            labels = mentions[keep, 1:].unbind(-1)
            total = total + sum(
                torch.nn.functional.cross_entropy(c, t, ignore_index=IGNORE, reduction="sum")
                / (t != IGNORE).sum().clamp(min=1)
                for c, t in zip(chunks, labels, strict=True)
            ) / len(labels)
        return total
