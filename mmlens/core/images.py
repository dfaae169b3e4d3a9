"""Any image -> the 8-bit RGB ``PIL.Image`` the processor expects, with the right scaling.

``PIL``'s ``convert("RGB")`` clips 16- and 32-bit images to 0..255 (a 16-bit photo comes out
almost white) and truncates float images to 0 or 1 (black). ``to_rgb`` scales instead:

- ``I;16`` (16-bit) and ``I`` (32-bit integer, as Pillow opens 16-bit PNGs): values 0..65535
  are divided by 257; ``I`` values outside 0..65535 are refused (their range is unknown).
- ``F`` (32-bit float) and float arrays/tensors: values must lie in ``[0, 1]`` (x 255);
  NaN, infinity or values outside are refused: scale the image first.
- ``P`` (palette), ``L``, ``1`` (1-bit: 0 / 255), ``CMYK``, ``YCbCr``: Pillow's conversion.
- Transparency (``RGBA``, ``LA``, ``PA``, palettes with a transparent colour): composited on
  a white background. White because a transparent image is meant to be seen on a page, and the
  pages the vision towers were trained on are white; ``convert("RGB")`` would instead show
  whatever colour hides under transparent pixels (often black). Pass ``background=`` to choose.
- numpy arrays ``HxW``, ``HxWxC`` (C = 1, 3, 4) of ``uint8``, ``uint16`` (/257), ``bool`` or
  float in ``[0, 1]``; torch tensors ``CxHxW`` (C = 1, 3, 4; torchvision's layout) or ``HxWxC``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from mmlens.core.errors import MMLensError

WHITE = (255, 255, 255)
CHANNELS = (1, 3, 4)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Any, *, source: str | None = None,
           background: tuple[int, int, int] = WHITE) -> Image.Image:
    """``image`` (PIL image, numpy array or torch tensor) as an 8-bit RGB ``PIL.Image``.

    ``source`` names the image in errors (a file, an example id). Raises ``MMLensError`` for
    images whose values cannot be mapped to 0..255 without guessing.
    """
    where = f" ({source})" if source else ""
    if isinstance(image, Image.Image):
        return _from_pil(image, where, background)
    if type(image).__module__.startswith("torch"):
        return _from_array(_tensor_to_hwc(image, where), where, background)
    if isinstance(image, np.ndarray):
        return _from_array(_numpy_to_hwc(image, where), where, background)
    raise MMLensError(f"image{where} is a {type(image).__name__}: give a PIL image, a numpy "
                      "array (HxWxC) or a torch tensor (CxHxW)")


def _from_pil(image: Image.Image, where: str, background: tuple[int, int, int]) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT or mode == "I":
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise MMLensError(f"image{where} is a 32-bit integer image with values "
                              f"{values.min()}..{values.max()}; mmlens reads integer images as "
                              "16-bit (0..65535): scale it to that range or to 8-bit first")
        return _gray(np.round(values / 257).astype(np.uint8))
    if mode == "F":
        return _gray(_unit_float_to_uint8(np.asarray(image), where))
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    elif mode == "P":
        return image.convert("RGB")
    if mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        return _composite(image, background)
    if mode in ("1", "L", "CMYK", "YCbCr", "RGBX"):
        return image.convert("RGB")
    raise MMLensError(f"image{where} has mode {mode!r}, which mmlens does not convert: "
                      "save it as RGB, grayscale or 16-bit grayscale")


def _composite(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    canvas = Image.new("RGBA", image.size, (*background, 255))
    return Image.alpha_composite(canvas, image).convert("RGB")


def _gray(values: np.ndarray) -> Image.Image:
    return Image.fromarray(values).convert("RGB")


def _unit_float_to_uint8(values: np.ndarray, where: str) -> np.ndarray:
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise MMLensError(f"float image{where} holds NaN or infinite values: fix the image")
    if values.size and (values.min() < 0 or values.max() > 1):
        hint = " (divide by 255?)" if values.max() <= 255 and values.min() >= 0 else ""
        raise MMLensError(f"float image{where} has values {values.min():.4g}..{values.max():.4g}"
                          f"; float images must lie in [0, 1]{hint}")
    return np.round(values * 255).astype(np.uint8)


def _numpy_to_hwc(array: np.ndarray, where: str) -> np.ndarray:
    if array.ndim == 3 and array.shape[-1] not in CHANNELS and array.shape[0] in CHANNELS:
        array = np.moveaxis(array, 0, -1)  # CxHxW
    return _check_shape(array, where)


def _tensor_to_hwc(tensor: Any, where: str) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()
    if tensor.ndim == 3 and tensor.shape[0] in CHANNELS:
        tensor = tensor.permute(1, 2, 0)  # CxHxW, torchvision's layout
    return _check_shape(tensor.numpy(), where)


def _check_shape(array: np.ndarray, where: str) -> np.ndarray:
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in CHANNELS:
        raise MMLensError(f"image array{where} has shape {tuple(array.shape)}: give one image, "
                          "HxW, HxWxC or (tensors) CxHxW with C = 1, 3 or 4")
    return array


def _from_array(array: np.ndarray, where: str, background: tuple[int, int, int]) -> Image.Image:
    """``HxWxC`` values -> RGB, scaled by dtype (uint8 as is, uint16 / 257, float x 255)."""
    if array.dtype == np.uint8:
        values = array
    elif array.dtype == np.bool_:
        values = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        values = np.round(array.astype(np.float64) / 257).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        values = _unit_float_to_uint8(array, where)
    else:
        raise MMLensError(f"image array{where} has dtype {array.dtype}: give uint8 (0..255), "
                          "uint16 (0..65535) or float in [0, 1]")
    values = np.ascontiguousarray(values)
    channels = values.shape[-1]
    if channels == 1:
        return _gray(values[:, :, 0])
    if channels == 4:
        return _composite(Image.fromarray(values), background)
    return Image.fromarray(values)
