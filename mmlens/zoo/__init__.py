"""Small models bundled with mmlens, and the code that builds and trains them."""

from mmlens.zoo.registry import BUNDLED, resolve_bundled
from mmlens.zoo.tiny import tiny_checkpoint

__all__ = ["BUNDLED", "resolve_bundled", "tiny_checkpoint"]
