"""What every layer shares: mmlens's error classes, image decoding (``to_rgb``) and the named
image size (``ImageSize``, width first)."""

from mmlens.core.errors import MMLensError
from mmlens.core.images import to_rgb
from mmlens.core.sizes import ImageSize, as_image_size

__all__ = ["ImageSize", "MMLensError", "as_image_size", "to_rgb"]
