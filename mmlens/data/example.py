"""The one record every dataset in mmlens yields: an image, a question about it, and its answer."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from PIL import Image, ImageOps

from mmlens.core.errors import MMLensError, MMLensFileNotFoundError
from mmlens.core.sizes import ImageSize, SizeOrPair, as_image_size

TASKS: tuple[str, ...] = (
    "ChooseAttr",
    "ChooseCat",
    "ChooseRel",
    "CompareAttr",
    "LogicalObj",
    "QueryAttr",
)

ORIENTATION_TAG = 0x0112  # EXIF "Orientation": 1 upright, 2-8 flipped and/or rotated

Box = tuple[float, float, float, float]
"""An object box ``(x, y, w, h)`` in pixels of the original image, GQA's convention."""


@dataclass
class Example:
    """One visual question.

    ``boxes`` are the boxes of the objects the question is about (the central object, or object 1
    and object 2), in pixels of the original image. ``wrong_answer`` is the other option of a
    choose-question (``None`` where the question offers none). ``image_size`` is the size the
    data records for the image its boxes were drawn on (``None``: not recorded); ``boxes_for``
    checks the loaded image against it, and with ``rescale_boxes`` rescales the boxes to an
    image of the same aspect ratio at another resolution.
    ``exif_orientation`` is the EXIF orientation (2-8) that ``load_image`` applied to the file
    it read (1: the tag says upright; ``None``: no tag, or not read from a file).
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
    image_size: SizeOrPair | None = None
    rescale_boxes: bool = False
    exif_orientation: int | None = None

    def load_image(self) -> Image.Image:
        """The example's image as 8-bit RGB (``to_rgb``), read from ``image_path`` if needed.

        A file's EXIF orientation is applied (``PIL.ImageOps.exif_transpose``, as Hugging
        Face's ``load_image`` does), so the image is upright as a viewer shows it; the tag is
        kept in ``exif_orientation``. Boxes are in pixels of the upright image.
        """
        from mmlens.core.images import to_rgb

        if self.image is not None:
            return to_rgb(self.image, source=f"example {self.example_id!r}")
        if self.image_path is None:
            raise MMLensError(
                f"example {self.example_id!r} has neither an image nor an image_path: "
                "give one of them"
            )
        if not Path(self.image_path).is_file():
            raise MMLensFileNotFoundError(
                f"image of example {self.example_id!r} not found at {self.image_path}: "
                "check the images folder you passed"
            )
        where = f"{self.image_path} (example {self.example_id!r})"
        try:
            with Image.open(self.image_path) as img:
                img.load()
                self.exif_orientation = img.getexif().get(ORIENTATION_TAG)
                return to_rgb(ImageOps.exif_transpose(img), source=where)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            if isinstance(err, MMLensError):
                raise
            raise MMLensError(
                f"cannot read the image {where}: {err}; the file is truncated or not an "
                "image: replace it, or leave the example out"
            ) from err

    def boxes_for(self, image_size: SizeOrPair) -> list[Box]:
        """The boxes in pixels of the loaded image of size ``image_size``.

        Where the data records another size, refuse (boxes would land on the wrong patches),
        unless ``rescale_boxes`` and the aspect ratio is the same up to rounding.
        """
        size = as_image_size(image_size)
        where = f"example {self.example_id!r}"
        if self.image_size is None:
            return [check_box(box, where, size) for box in self.boxes]
        recorded = as_image_size(self.image_size, f"recorded image size of {self.example_id!r}")
        if size == recorded:
            return [check_box(box, where, size) for box in self.boxes]
        for box in self.boxes:
            check_box(box, where, recorded)
        width, height, rec_w, rec_h = size.width, size.height, recorded.width, recorded.height
        name = self.image_path or "the in-memory image"
        same_aspect = abs(width * rec_h - height * rec_w) <= (rec_w + rec_h) / 2
        if not self.rescale_boxes or not same_aspect:
            what = ("rescale_boxes=True (--rescale-boxes) maps the boxes to it"
                    if same_aspect else "its aspect ratio differs, so the boxes cannot be "
                    "mapped: use the images the data was annotated on")
            raise MMLensError(
                f"image {name} of example {self.example_id!r} is {width}x{height} but the data "
                f"records {rec_w}x{rec_h} for it; {what}"
            )
        sx, sy = width / rec_w, height / rec_h
        return [(x * sx, y * sy, w * sx, h * sy) for x, y, w, h in self.boxes]


def check_box(box: Any, where: str, image_size: SizeOrPair | None = None) -> Box:
    """``box`` as four finite numbers ``(x, y, w, h)`` with no negative value, or raise.

    With ``image_size`` (of the image the box is drawn on) a box that starts past the image's
    right or bottom edge is refused too: it would mark no patch, and its flows would read as
    no change. A box that overhangs the edge is kept and clipped to the image (Visual Genome's
    boxes, and so GQA's, can reach past the edge); a box of width or height 0 is kept (the
    paper's pixel rule draws it as a line).
    """
    values = tuple(box)
    if len(values) != 4:
        raise MMLensError(f"{where}: box {values} must be four numbers (x, y, w, h)")
    try:
        numbers = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise MMLensError(f"{where}: box {values} must be four numbers (x, y, w, h)") from None
    if not all(math.isfinite(v) for v in numbers):
        raise MMLensError(f"{where}: box {values} holds NaN or infinity: fix or drop the box")
    if min(numbers) < 0:
        raise MMLensError(f"{where}: box {values} has a negative value: boxes are (x, y, w, h) "
                          "in pixels, all >= 0")
    if image_size is not None:
        _check_inside(numbers, values, where, as_image_size(image_size))
    return numbers


class BoxOutsideImageError(MMLensError):
    """A box with no pixel inside its image: the study drops its example, naming the reason."""


def warn_boxes_outside(examples: list[Example], source: str) -> None:
    """Warn, with their count and first ids, about examples whose box lies outside the image
    size the data records: they load (the data stays complete) but the study drops them."""
    outside = []
    for example in examples:
        if example.image_size is None:
            continue
        size = as_image_size(example.image_size)
        if any(box[0] >= size.width or box[1] >= size.height for box in example.boxes):
            outside.append(example.example_id)
    if outside:
        warnings.warn(f"{source}: {len(outside)} example(s) have a box outside their recorded "
                      f"image ({', '.join(outside[:5])}{' ...' if len(outside) > 5 else ''}); "
                      "the study drops them as 'box outside the image' (see dropped.csv)",
                      stacklevel=3)


def _check_inside(box: Box, given: tuple, where: str, size: ImageSize) -> None:
    x, y, _, _ = box
    if x >= size.width or y >= size.height:
        raise BoxOutsideImageError(
            f"{where}: box {given} (x, y, w, h) lies outside the {size.width}x{size.height} "
            "image, with no pixel inside it: fix the box, or use the image the data was "
            "annotated on")


def check_image_id(image_id: str, where: str) -> str:
    """``image_id`` if, joined to the images folder as ``{folder}/{id}.jpg``, it stays inside it.

    An absolute path (``/etc/x``, ``C:\\x``) or a ``..`` part would read a file outside the
    folder, and the report would embed it: refused, naming ``where`` (the file and row).
    """
    outside = (PurePosixPath(image_id).is_absolute() or PureWindowsPath(image_id).anchor
               or ".." in re.split(r"[\\/]", image_id) or "\0" in image_id)
    if outside:
        raise MMLensError(f"{where}: image id {image_id!r} leads outside the images folder (an "
                          "absolute path or a '..' part): image ids name files inside the images "
                          "folder, fix the id")
    return image_id
