"""The free-form Describe task: its answer is read off the drawn scene by an independent rule,
its words are all in the bundled tokenizer, its boxes are the two objects it is about."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from mmlens.data.shapes import ANSWERS, COLORS, SHAPES, SIZES, generate_per_task
from mmlens.zoo import BUNDLED
from mmlens.zoo.build import build_tokenizer, vocabulary

N = 96


@pytest.fixture(scope="module")
def examples():
    return generate_per_task(N, seed=11, tasks=["Describe"])


def _drawn(image, colour):
    """Pixels of ``colour`` in the image: (columns, rows) of one object's colour."""
    pixels = np.asarray(image).astype(int)
    ys, xs = np.nonzero(np.abs(pixels - np.array(colour)).sum(axis=2) == 0)
    return xs, ys


def test_the_answer_is_the_only_object_left_of_the_named_one(examples):
    """Recomputed from the question's words and the objects alone: the named object is the one
    matching every word of the phrase; the answer is the one object whose centre is left of
    its centre, described as size, colour, shape."""
    for e in examples:
        phrase = re.fullmatch(r"What is the object to the left of the (.+)\?", e.question)[1]
        words = phrase.split()
        named = [o for o in e.objects
                 if words[-1] == o.shape and all(w in (o.color, o.size) for w in words[:-1])]
        assert len(named) == 1, e.question
        centre = named[0].x + named[0].w / 2
        left = [o for o in e.objects if o.x + o.w / 2 < centre]
        assert len(left) == 1, e.question
        (target,) = left
        assert target.x + target.w <= named[0].x  # wholly left of it
        assert e.answer == f"{target.size} {target.color} {target.shape}"
        assert e.boxes == [target.box, named[0].box]


def test_the_answer_object_is_drawn_in_its_colour_left_of_the_named_one(examples):
    """The pixels themselves: the answer's colour is drawn inside its box."""
    for e in examples[:12]:
        target = e.objects[e.subjects[0]]
        xs, ys = _drawn(e.image, COLORS[target.color])
        inside = (xs >= target.x) & (xs < target.x + target.w) & (ys >= target.y) & (
            ys < target.y + target.h)
        assert inside.sum() > 20


def test_answers_cycle_over_every_description_and_words_are_known(examples):
    assert set(ANSWERS["Describe"]) == {f"{s} {c} {h}" for s in SIZES for c in COLORS
                                        for h in SHAPES}
    counts = Counter(e.answer for e in examples)
    assert set(counts) == set(ANSWERS["Describe"]) and max(counts.values()) == N // 24
    known = set(build_tokenizer().get_vocab())
    for e in examples:
        assert set(re.findall(r"\w+|[^\w\s]", e.question)) <= known
        assert set(e.answer.capitalize().split()) <= known
    # the task added no word: the vocabulary is the one the bundled model was trained with
    saved = json.loads((BUNDLED["shapes-llava"] / "tokenizer.json").read_text())["model"]
    assert vocabulary() == sorted(saved["vocab"], key=saved["vocab"].get)


def test_the_training_scripts_decoding_is_hf_greedy_generation():
    """``greedy_answers`` (batched, right-padded) equals ``generate`` one example at a time."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from mmlens.zoo.free_form_eval import greedy_answers
    from mmlens.zoo.train import ShapesQuestions, pixel_values

    folder = BUNDLED["shapes-llava"]
    if not (folder / "config.json").is_file():
        pytest.skip("shapes-llava is not bundled here")
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    tokenizer = build_tokenizer()
    data = ShapesQuestions(tokenizer, seed=3, size=112, n_image=64,
                           tasks=("Describe", "ChooseCat"))
    items = [data[i] for i in range(4)]
    batched = greedy_answers(model, tokenizer, items, "cpu", max_new_tokens=5)
    for item, answer in zip(items, batched, strict=True):
        ids = torch.tensor([item["ids"]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values=pixel_values(item["pixels"][None]),
                             max_new_tokens=5, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id)
        expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert answer == expected.strip().lower()
