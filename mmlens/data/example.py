"""The one record every dataset in mmlens yields: an image, a question about it, and its answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

TASKS: tuple[str, ...] = (
    "ChooseAttr",
    "ChooseCat",
    "ChooseRel",
    "CompareAttr",
    "LogicalObj",
    "QueryAttr",
)

Box = tuple[float, float, float, float]
"""An object box ``(x, y, w, h)`` in pixels of the original image, GQA's convention."""


@dataclass
class Example:
    """One visual question.

    ``boxes`` are the boxes of the objects the question is about (the central object, or object 1
    and object 2), in pixels of the original image. ``wrong_answer`` is the other option of a
    choose-question (``None`` where the question offers none).
    """

    example_id: str
    question: str
    answer: str
    task: str
    image_id: str
    boxes: list[Box] = field(default_factory=list)
    wrong_answer: str | None = None
    image: Image.Image | None = None
    image_path: Path | None = None

    def load_image(self) -> Image.Image:
        """The example's image as RGB, read from ``image_path`` when not held in memory."""
        if self.image is not None:
            return self.image.convert("RGB")
        if self.image_path is None:
            raise ValueError(
                f"example {self.example_id!r} has neither an image nor an image_path: "
                "give one of them"
            )
        if not Path(self.image_path).is_file():
            raise FileNotFoundError(
                f"image of example {self.example_id!r} not found at {self.image_path}: "
                "check the images folder you passed"
            )
        with Image.open(self.image_path) as img:
            return img.convert("RGB")
