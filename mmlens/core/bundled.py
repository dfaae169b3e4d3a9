"""Models that ship inside the mmlens package (in ``mmlens/zoo/``), usable offline by name."""

from __future__ import annotations

from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"

BUNDLED: dict[str, Path] = {
    "shapes-llava": ZOO_DIR / "shapes-llava",
}
"""Name -> folder holding a Hugging Face model (``config.json``, weights, processor)."""


def resolve_bundled(name: str) -> Path | None:
    """The folder of bundled model ``name``, or ``None`` if mmlens ships no model by that name.

    Raises ``FileNotFoundError`` when the name is bundled but its folder is missing (an install
    without package data).
    """
    path = BUNDLED.get(name)
    if path is None:
        return None
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"bundled model {name!r} should be at {path} but has no config.json there: "
            "reinstall mmlens with its package data, or train it with "
            f"`python -m mmlens.zoo.train --out {path}`"
        )
    return path
