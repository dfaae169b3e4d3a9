"""Hugging Face's keyword names at the model's door: ``model(**processor(images=..., text=...))``.

A processor returns ``input_ids``, ``attention_mask``, ``pixel_values`` in its own layout and,
per family, the images' geometry under the name the family declares (``Family.image_sizes_key``:
``image_sizes`` for LLaVA-NeXT and OneVision, ``image_grid_thw`` for Qwen-VL), plus bookkeeping
that the model can check but does not need (``mm_token_type_ids``, ``batch_num_images``).
``read_processor_outputs`` maps them onto ``forward``'s arguments and refuses any other name,
listing the accepted ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmlens.core.errors import MMLensError

FORWARD_NAMES = ("input_ids", "pixel_values", "attention_mask", "image_sizes")
"""HF names that are ``forward`` arguments of the same meaning."""
CHECKED_NAMES = ("mm_token_type_ids", "batch_num_images")
"""HF names the model does not need; each is checked against the rest of the inputs. A name
that changes what a model computes (PaliGemma's ``token_type_ids``) is not one of them: the
family that reads it must take it."""


def accepted_names(sizes_key: str, derived: tuple[str, ...] = ()) -> list[str]:
    """Every processor output name ``forward`` accepts for a family with ``sizes_key`` (and
    the outputs it recomputes itself, ``Family.derived_names``)."""
    return sorted({*FORWARD_NAMES, sizes_key, *CHECKED_NAMES, *derived})


def read_processor_outputs(outputs: dict[str, Any], *, sizes_key: str, image_token_id: int,
                           family: str, derived: tuple[str, ...] = ()) -> dict[str, Any]:
    """``outputs`` (``forward``'s extra keywords) -> ``{"image_sizes": ...}`` plus the names of
    ``FORWARD_NAMES`` given; raises on unknown names and on inconsistent bookkeeping (the
    family checks its ``derived`` names itself)."""
    accepted = accepted_names(sizes_key, derived)
    unknown = sorted(set(outputs) - set(accepted))
    if unknown:
        other = [k for k in ("image_sizes", "image_grid_thw") if k in unknown]
        hint = (f" ({family} reads the images' geometry from {sizes_key!r}, not "
                f"{', '.join(map(repr, other))}: is this another family's processor output?)"
                if other else "")
        raise MMLensError(f"unexpected keyword argument(s) {', '.join(map(repr, unknown))} for "
                          f"a {family} model{hint}; it accepts the processor outputs "
                          f"{', '.join(accepted)} and forward's own arguments")
    read = {k: outputs[k] for k in FORWARD_NAMES if k in outputs}
    if sizes_key != "image_sizes" and sizes_key in outputs:
        if "image_sizes" in outputs:
            raise MMLensError(f"got both image_sizes and {sizes_key}: pass one (the processor's "
                              f"{sizes_key})")
        read["image_sizes"] = outputs[sizes_key]
    ids = read.get("input_ids")
    mm_types = outputs.get("mm_token_type_ids")
    if mm_types is not None and ids is not None:
        is_image = torch.as_tensor(mm_types).to(ids.device) == 1
        if is_image.shape != ids.shape or not torch.equal(is_image, ids == image_token_id):
            raise MMLensError("mm_token_type_ids does not mark exactly the image tokens of "
                              "input_ids: pass the processor's outputs together, unedited")
    counts = outputs.get("batch_num_images")
    pixels = read.get("pixel_values")
    if counts is not None and pixels is not None and isinstance(pixels, Tensor):
        if int(torch.as_tensor(counts).sum()) != pixels.shape[0]:
            raise MMLensError(f"batch_num_images adds up to {int(torch.as_tensor(counts).sum())}"
                              f" images but pixel_values holds {pixels.shape[0]}: pass the "
                              "processor's outputs together, unedited")
    return read
