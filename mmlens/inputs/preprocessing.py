"""How images reach the vision tower: the processor's geometry, the mode a study asks for, and
LLaVA-1.5's padding to a square.

    processor_geometry(image_processor, 336)     # "resize_crop" | "resize" | "pad", else refused
    check_preprocessing(processor, "pad", 336)   # the mode, refused where the processor differs
    pad_to_square(image, processor)              # original LLaVA's expand2square

Spans map object boxes to patches through the same geometry (``mmlens.inputs.geometry``), so a
mode that differs from what the pixels go through is an error, never a silent mismatch.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from mmlens.core.errors import MMLensError
from mmlens.inputs.geometry import MODES


def pad_colour(processor: Any) -> tuple[int, ...]:
    """LLaVA's ``expand2square`` background: ``int(c * 255)`` of the image mean, truncated as
    the original code does (CLIP's mean gives ``(122, 116, 104)``)."""
    mean = getattr(processor.image_processor, "image_mean", None) or [0.5, 0.5, 0.5]
    return tuple(int(c * 255) for c in mean)


def pad_to_square(image: Image.Image, processor: Any) -> Image.Image:
    """Original LLaVA-1.5's preprocessing: centre the image on a square of the mean colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), pad_colour(processor))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _size_field(size: Any, name: str) -> Any:
    return size.get(name) if isinstance(size, dict) else getattr(size, name, None)


def processor_geometry(image_processor: Any, crop_size: int) -> str:
    """How ``image_processor`` takes an image to the ``crop_size`` square the tower sees.

    ``"resize_crop"`` (shortest edge to ``crop_size``, centre crop), ``"resize"`` (straight to
    ``crop_size`` x ``crop_size``, no crop) or ``"pad"`` (padded to a square first). Raises
    ``MMLensError`` for any other geometry: boxes could not be mapped to patches.
    """
    pads = getattr(image_processor, "do_pad_to_square", False) is True or getattr(
        image_processor, "do_pad", False) is True or getattr(
        image_processor, "mmlens_preprocessing", None) == "pad"
    size, crop = getattr(image_processor, "size", None), getattr(image_processor, "crop_size", None)
    square = (_size_field(size, "height"), _size_field(size, "width")) == (crop_size, crop_size)
    base = None
    if getattr(image_processor, "do_resize", False) is True:
        if not getattr(image_processor, "do_center_crop", False):
            base = "resize" if square else None
        elif (_size_field(crop, "height"), _size_field(crop, "width")) == (crop_size, crop_size):
            if _size_field(size, "shortest_edge") == crop_size:
                base = "resize_crop"
            elif square:
                base = "resize"
    if base is not None:
        return "pad" if pads else base  # a padded square: either takes it to the crop square
    raise MMLensError(
        f"cannot map object boxes through this image processor "
        f"({type(image_processor).__name__}: do_resize="
        f"{getattr(image_processor, 'do_resize', None)}, size={dict(size or {}) or None}, "
        f"do_center_crop={getattr(image_processor, 'do_center_crop', None)}, crop_size="
        f"{dict(crop or {}) or None}): mmlens maps boxes for a resize of the shortest edge to "
        f"{crop_size} then a centre crop, a resize to {crop_size}x{crop_size}, or padding to a "
        "square; use a processor configured like one of these"
    )


def check_preprocessing(processor: Any, mode: str | None, crop_size: int) -> str:
    """``mode`` (default: the processor's geometry), refused where the processor differs.

    ``"pad"`` is done by mmlens before the processor, which then sees a square: any known
    geometry takes a square to the same ``crop_size`` square.
    """
    if mode is not None and mode not in MODES:
        raise MMLensError(f"unknown preprocessing mode {mode!r}: use one of {MODES}")
    actual = processor_geometry(getattr(processor, "image_processor", None), crop_size)
    if mode is None or mode == "pad" or mode == actual:
        return mode or actual
    raise MMLensError(
        f"preprocessing={mode!r} was asked for, but the model's processor does {actual!r}: "
        f"boxes would be mapped to the wrong patches; pass preprocessing={actual!r} (or None)"
    )


def checked_mode(mode: str | None) -> str:
    """``mode`` (default ``"resize_crop"``), refused when it is no known preprocessing mode."""
    mode = mode or "resize_crop"
    if mode not in MODES:
        raise MMLensError(f"unknown preprocessing mode {mode!r}: use one of {MODES}")
    return mode
