"""Models that ship inside the mmlens package, usable offline by name (see ``core.bundled``)."""

from mmlens.core.bundled import BUNDLED, ZOO_DIR, resolve_bundled

__all__ = ["BUNDLED", "ZOO_DIR", "resolve_bundled"]
