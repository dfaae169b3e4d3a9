"""Image sizes as one named type, ``ImageSize(width, height)``, read by name.

Why width first: every size mmlens handles starts as a PIL image's ``Image.size``, which is
``(width, height)``, and every box is x first as well (GQA's ``(x, y, w, h)``, the corners
``(x0, y0, x1, y1)``), so a size and the boxes drawn on it read in the same order, and
``ImageSize(*image.size)`` is the image's size. Hugging Face alone is height first: the rows of
its ``image_sizes`` tensors and of ``image_grid_pinpoints`` are ``(height, width)``. Those
pairs are converted where they cross into or out of mmlens, with ``ImageSize.from_hw`` and
``ImageSize.hw`` (``mmlens.inputs.tiling.read_image_sizes`` / ``image_sizes_tensor`` for the
tensors); no ``(height, width)`` pair travels inside mmlens.

Code takes a size apart by name, ``size.width`` and ``size.height``, never by position. A
function that takes a size accepts an ``ImageSize``; a bare pair is converted by one rule,
``as_image_size``: it is read as ``(width, height)``, PIL's order, so ``image.size`` may be
passed as it is. ``AnyresGeometry``'s methods, beside Hugging Face's ``(height, width)``
rows, take only an ``ImageSize`` and refuse a bare pair.
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

from mmlens.core.errors import MMLensError


class ImageSize(NamedTuple):
    """The size of an image in pixels, ``width`` (x, columns) then ``height`` (y, rows)."""

    width: int
    height: int

    @classmethod
    def of(cls, image: Any) -> ImageSize:
        """The size of a PIL image (its ``Image.size``, which is ``(width, height)``)."""
        size = getattr(image, "size", None)
        if not isinstance(size, tuple) or len(size) != 2:
            raise MMLensError(f"ImageSize.of takes a PIL image, not a {type(image).__name__}: "
                              "convert the image with mmlens.core.to_rgb first")
        width, height = size  # PIL's order
        return cls(width=width, height=height)

    @classmethod
    def from_hw(cls, height: int, width: int) -> ImageSize:
        """From a Hugging Face ``(height, width)`` pair (a row of ``image_sizes``)."""
        return cls(width=width, height=height)

    @property
    def hw(self) -> tuple[int, int]:
        """``(height, width)``, the order of Hugging Face's ``image_sizes`` rows."""
        return (self.height, self.width)

    def __str__(self) -> str:
        return f"{self.width}x{self.height} (width x height)"


SizeOrPair = ImageSize | tuple[int, int]
"""What a function taking an image size accepts: an ``ImageSize``, or a bare pair that it
converts on entry by its documented rule (``as_image_size``: ``(width, height)``)."""


def as_image_size(size: Any, what: str = "image size") -> ImageSize:
    """``size`` as a checked ``ImageSize``: an ``ImageSize`` as it is, a bare pair read as
    ``(width, height)`` (PIL's order). Raises ``MMLensError`` for anything else, and for sizes
    that are not positive whole numbers of pixels; ``what`` names the size in the message."""
    if isinstance(size, ImageSize):
        pair: tuple[Any, ...] = size
    else:
        try:
            pair = tuple(size)
        except TypeError:
            pair = ()
        if len(pair) != 2:
            raise MMLensError(f"{what} {size!r} is not a (width, height) pair: pass "
                              "ImageSize(width=..., height=...) or a PIL image's .size")
    try:
        width, height = (operator.index(side) for side in pair)
    except TypeError:
        raise MMLensError(f"{what} {tuple(pair)} (width, height) must be whole numbers of "
                          "pixels") from None
    if width <= 0 or height <= 0:
        raise MMLensError(f"{what} {tuple(pair)} (width, height) must be positive")
    return ImageSize(width=width, height=height)
