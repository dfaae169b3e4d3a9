"""Small models bundled with mmlens, and the code that builds and trains them."""

from mmlens.zoo.registry import BUNDLED, resolve_bundled

__all__ = ["BUNDLED", "resolve_bundled"]
