"""What every layer shares: mmlens's error classes and image decoding (``to_rgb``)."""

from mmlens.core.errors import MMLensError
from mmlens.core.images import to_rgb

__all__ = ["MMLensError", "to_rgb"]
