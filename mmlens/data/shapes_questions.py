"""Scenes of coloured shapes, and the six GQA-style questions asked about them.

Each builder takes the wanted answer and a seeded ``random.Random``, composes a scene in which
that answer is right and every object the question names is unique, and returns the objects
with a ``Question``. Builders return ``None`` when a random draw fails; ``ask`` retries.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from itertools import permutations

from mmlens.data.example import Box

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 47),
    "blue": (38, 99, 214),
    "green": (46, 160, 67),
    "yellow": (240, 196, 25),
}
SIZES: dict[str, float] = {"small": 0.17, "large": 0.30}
"""Side of a shape as a fraction of the image side."""

ANSWERS: dict[str, tuple[str, ...]] = {
    "ChooseAttr": (*COLORS, *SIZES),
    "ChooseCat": SHAPES,
    "ChooseRel": ("left", "right"),
    "CompareAttr": ("color", "size"),
    "LogicalObj": ("yes", "no"),
    "QueryAttr": ("left", "right"),
    "Describe": tuple(
        f"{size} {color} {shape}" for size in SIZES for color in COLORS for shape in SHAPES
    ),
}
"""Every answer of each task, lowercase as in the records; builders cycle through them."""

FREE_FORM_TASKS: tuple[str, ...] = ("Describe",)
"""Tasks whose answer is several words (``Describe``: "small red circle"), studied by
``mmlens.experiments.free_form.study`` over the whole answer rather than its first token."""

_GLUE_WORDS = (
    "Is is What On the a or to of left right do and have in common there which side object"
)
QUESTION_WORDS: tuple[str, ...] = (*SHAPES, *COLORS, *SIZES, *_GLUE_WORDS.split(), "?")
"""Every word and punctuation mark a question can contain."""


@dataclass(frozen=True)
class Layout:
    """Image side in pixels and the range of objects a scene holds (tasks may need more)."""

    image_size: int
    min_objects: int = 3
    max_objects: int = 5


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape; its box ``(x, y, w, h)`` holds every pixel drawn for it."""

    shape: str
    color: str
    size: str
    x: int
    y: int
    w: int
    h: int

    @property
    def box(self) -> Box:
        return (float(self.x), float(self.y), float(self.w), float(self.h))

    def matches(self, **attributes: str) -> bool:
        return all(getattr(self, name) == value for name, value in attributes.items())


@dataclass(frozen=True)
class Question:
    """A question about a scene.

    ``subjects`` index the objects the question is about (central object, or object 1 and 2);
    ``mentions`` pairs each phrase naming an object, in reading order, with its object index.
    """

    task: str
    text: str
    answer: str
    wrong_answer: str | None
    subjects: tuple[int, ...]
    mentions: tuple[tuple[str, int], ...]


Spec = tuple[str, str, str]  # (shape, color, size)


def _random_spec(rng: random.Random, **fixed: str) -> Spec:
    shape = fixed.get("shape") or rng.choice(SHAPES)
    color = fixed.get("color") or rng.choice(list(COLORS))
    size = fixed.get("size") or rng.choice(list(SIZES))
    return shape, color, size


def _separated(a: ShapeObject, b: ShapeObject, gap: int) -> bool:
    return (
        a.x + a.w + gap <= b.x
        or b.x + b.w + gap <= a.x
        or a.y + a.h + gap <= b.y
        or b.y + b.h + gap <= a.y
    )


def _place(rng: random.Random, specs: list[Spec], image_size: int) -> list[ShapeObject] | None:
    """Random non-overlapping positions for ``specs``, in order; ``None`` if they do not fit."""
    margin, gap = max(1, round(0.02 * image_size)), max(2, round(0.03 * image_size))
    placed: list[ShapeObject] = []
    for shape, color, size in specs:
        side = round(SIZES[size] * image_size)
        for _ in range(60):
            x = rng.randint(margin, image_size - margin - side)
            y = rng.randint(margin, image_size - margin - side)
            candidate = ShapeObject(shape, color, size, x, y, side, side)
            if all(_separated(candidate, other, gap) for other in placed):
                placed.append(candidate)
                break
        else:
            return None
    return placed


def _compose(
    rng: random.Random,
    required: list[Spec],
    layout: Layout,
    allow: Callable[[Spec], bool] = lambda spec: True,
    at_least: int = 1,
) -> tuple[list[ShapeObject], list[int]] | None:
    """A shuffled scene holding ``required`` plus random extras that pass ``allow``.

    Returns the objects and the indices of the required ones, in the order given.
    """
    fewest = max(layout.min_objects, len(required), at_least)
    n_objects = rng.randint(fewest, max(layout.max_objects, fewest))
    specs = list(required)
    for _ in range(100 * n_objects):
        if len(specs) == n_objects:
            break
        spec = _random_spec(rng)
        if allow(spec):
            specs.append(spec)
    objects = _place(rng, specs, layout.image_size)
    if objects is None:
        return None
    order = list(range(len(objects)))
    rng.shuffle(order)
    shuffled = [objects[i] for i in order]
    return shuffled, [order.index(i) for i in range(len(required))]


def _refer(objects: list[ShapeObject], target: int, qualifiers: tuple[str, ...]) -> str | None:
    """The shortest phrase (shape, or qualifier + shape) naming only ``objects[target]``."""
    obj = objects[target]
    for names in ((), *((q,) for q in qualifiers)):
        attributes = {"shape": obj.shape, **{q: getattr(obj, q) for q in names}}
        if sum(o.matches(**attributes) for o in objects) == 1:
            return " ".join([*(attributes[q] for q in names), obj.shape])
    return None


def _two_options(rng: random.Random, answer: str, wrong: str) -> tuple[str, str]:
    return (answer, wrong) if rng.random() < 0.5 else (wrong, answer)


def _choose_attr(rng: random.Random, answer: str, layout: Layout) -> tuple | None:
    attribute, other = ("color", "size") if answer in COLORS else ("size", "color")
    values = list(COLORS) if attribute == "color" else list(SIZES)
    wrong = rng.choice([v for v in values if v != answer])
    composed = _compose(rng, [_random_spec(rng, **{attribute: answer})], layout)
    if composed is None:
        return None
    objects, (target,) = composed
    ref = _refer(objects, target, (other,))
    if ref is None:
        return None
    first, second = _two_options(rng, answer, wrong)
    text = f"Is the {ref} {first} or {second}?"
    return objects, Question("ChooseAttr", text, answer, wrong, (target,), ((ref, target),))


def _choose_cat(rng: random.Random, answer: str, layout: Layout) -> tuple | None:
    wrong = rng.choice([s for s in SHAPES if s != answer])
    composed = _compose(rng, [_random_spec(rng, shape=answer)], layout)
    if composed is None:
        return None
    objects, (target,) = composed
    obj = objects[target]
    if sum(o.color == obj.color for o in objects) == 1:
        ref = f"{obj.color} object"
    elif sum(o.matches(color=obj.color, size=obj.size) for o in objects) == 1:
        ref = f"{obj.size} {obj.color} object"
    else:
        return None
    first, second = _two_options(rng, answer, wrong)
    text = f"Is the {ref} a {first} or a {second}?"
    return objects, Question("ChooseCat", text, answer, wrong, (target,), ((ref, target),))


def _choose_rel(rng: random.Random, answer: str, layout: Layout) -> tuple | None:
    composed = _compose(rng, [], layout, at_least=2)
    if composed is None:
        return None
    objects, _ = composed
    wrong = "right" if answer == "left" else "left"

    def fully_left(a: ShapeObject, b: ShapeObject) -> bool:
        return a.x + a.w <= b.x

    pairs = [
        (i, j)
        for i, j in permutations(range(len(objects)), 2)
        if (
            fully_left(objects[i], objects[j])
            if answer == "left"
            else fully_left(objects[j], objects[i])
        )
    ]
    rng.shuffle(pairs)
    for i, j in pairs:
        ref_i = _refer(objects, i, ("color", "size"))
        ref_j = _refer(objects, j, ("color", "size"))
        if ref_i and ref_j:
            first, second = _two_options(rng, answer, wrong)
            text = f"Is the {ref_i} to the {first} or to the {second} of the {ref_j}?"
            mentions = ((ref_i, i), (ref_j, j))
            return objects, Question("ChooseRel", text, answer, wrong, (i, j), mentions)
    return None


def _compare_attr(rng: random.Random, answer: str, layout: Layout) -> tuple | None:
    shape_a, shape_b = rng.sample(SHAPES, 2)
    if answer == "color":
        color_a = color_b = rng.choice(list(COLORS))
        size_a, size_b = rng.sample(list(SIZES), 2)
    else:
        color_a, color_b = rng.sample(list(COLORS), 2)
        size_a = size_b = rng.choice(list(SIZES))
    required = [(shape_a, color_a, size_a), (shape_b, color_b, size_b)]
    composed = _compose(rng, required, layout, lambda s: s[0] not in (shape_a, shape_b))
    if composed is None:
        return None
    objects, (a, b) = composed
    text = f"What do the {shape_a} and the {shape_b} have in common?"
    mentions = ((shape_a, a), (shape_b, b))
    return objects, Question("CompareAttr", text, answer, None, (a, b), mentions)


def _logical_obj(rng: random.Random, answer: str, layout: Layout) -> tuple | None:
    (color_a, color_b), (shape_a, shape_b) = rng.sample(list(COLORS), 2), rng.choices(SHAPES, k=2)
    described = [(shape_a, color_a), (shape_b, color_b)]
    present = rng.choice([(0,), (1,), (0, 1)]) if answer == "yes" else ()
    required = [_random_spec(rng, shape=described[k][0], color=described[k][1]) for k in present]
    if rng.random() < 0.5:  # a near miss: one description's colour on the other's shape
        required.append(_random_spec(rng, shape=shape_b, color=color_a))
    composed = _compose(rng, required, layout, lambda s: (s[0], s[1]) not in described)
    if composed is None:
        return None
    objects, indices = composed
    found = dict(zip(present, indices[: len(present)], strict=True))
    if any(
        sum(o.matches(shape=s, color=c) for o in objects) != (k in found)
        for k, (s, c) in enumerate(described)
    ):
        return None
    phrases = [f"{color_a} {shape_a}", f"{color_b} {shape_b}"]
    text = f"Is there a {phrases[0]} or a {phrases[1]}?"
    mentions = tuple((phrases[k], found[k]) for k in (0, 1) if k in found)
    subjects = tuple(index for _, index in mentions)
    return objects, Question("LogicalObj", text, answer, None, subjects, mentions)


def _query_attr(rng: random.Random, answer: str, layout: Layout) -> tuple | None:
    composed = _compose(rng, [], layout)
    if composed is None:
        return None
    objects, _ = composed
    half, margin = layout.image_size / 2, round(0.03 * layout.image_size)
    candidates = [
        i
        for i, o in enumerate(objects)
        if (o.x + o.w <= half - margin if answer == "left" else o.x >= half + margin)
    ]
    rng.shuffle(candidates)
    for i in candidates:
        ref = _refer(objects, i, ("color", "size"))
        if ref:
            text = f"On which side is the {ref}?"
            return objects, Question("QueryAttr", text, answer, None, (i,), ((ref, i),))
    return None


def _describe(rng: random.Random, answer: str, layout: Layout) -> tuple | None:
    """"What is the object to the left of the {ref}?" -> "{size} {color} {shape}".

    The answer object is the only one whose centre lies left of the named object's centre,
    and it lies wholly left of it; subjects are (answer object, named object).
    """
    size, color, shape = answer.split()
    composed = _compose(rng, [(shape, color, size)], layout, at_least=2)
    if composed is None:
        return None
    objects, (target,) = composed
    by_centre = sorted(range(len(objects)), key=lambda i: 2 * objects[i].x + objects[i].w)
    centres = [2 * objects[i].x + objects[i].w for i in by_centre]
    if by_centre[0] != target or len(set(centres[:3])) < len(centres[:3]):
        return None
    named = by_centre[1]
    if objects[target].x + objects[target].w > objects[named].x:
        return None
    ref = _refer(objects, named, ("color", "size"))
    if ref is None:
        return None
    text = f"What is the object to the left of the {ref}?"
    return objects, Question("Describe", text, answer, None, (target, named), ((ref, named),))


BUILDERS = {
    "ChooseAttr": _choose_attr,
    "ChooseCat": _choose_cat,
    "ChooseRel": _choose_rel,
    "CompareAttr": _compare_attr,
    "LogicalObj": _logical_obj,
    "QueryAttr": _query_attr,
    "Describe": _describe,
}


def ask(
    task: str, answer: str, rng: random.Random, layout: Layout
) -> tuple[list[ShapeObject], Question]:
    """A scene and a ``task`` question about it whose gold answer is ``answer``."""
    if task not in BUILDERS:
        raise ValueError(f"unknown task {task!r}: choose from {sorted(BUILDERS)}")
    if answer not in ANSWERS[task]:
        raise ValueError(f"{answer!r} is no answer of {task}: choose from {ANSWERS[task]}")
    for _ in range(1000):
        built = BUILDERS[task](rng, answer, layout)
        if built is not None:
            return built
    raise RuntimeError(
        f"could not compose a {task} scene in {layout}: use a larger image or fewer objects"
    )
