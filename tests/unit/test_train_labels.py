"""The training script's targets: answers, per-patch object labels and named-phrase labels."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from mmlens.data import TASKS
from mmlens.data.shapes import COLORS, SHAPES, SIZES, draw_scene, generate_one
from mmlens.zoo.build import build_processor
from mmlens.zoo.probes import IGNORE, Probes, object_labels
from mmlens.zoo.train import ShapesQuestions, collate

SIZE, PATCH, N_IMAGE = 112, 14, 64
WHITE = (255, 255, 255)


@pytest.fixture(scope="module")
def tokenizer():
    return build_processor(SIZE).tokenizer


@pytest.fixture(scope="module")
def data(tokenizer):
    return ShapesQuestions(tokenizer, seed=5, size=SIZE, n_image=N_IMAGE)


def test_items_match_the_generator(data, tokenizer):
    for i in range(12):
        item = data[i]
        example = generate_one(TASKS[i % 6], i // 6, 5, SIZE)
        assert item["answer"] == example.answer
        assert item["ids"].count(tokenizer.convert_tokens_to_ids("<image>")) == N_IMAGE
        assert (item["pixels"].permute(1, 2, 0).numpy() == np.asarray(example.image)).all()


def test_patch_labels_by_counting_pixels(data):
    """Each patch's label, recomputed from one drawing per object."""
    for i in range(6):
        example = generate_one(TASKS[i], 0, 5, SIZE)
        labels = data[i]["patches"]
        drawn = [
            (np.asarray(draw_scene([o], SIZE, WHITE)) != 255).any(axis=2) for o in example.objects
        ]
        for patch in range(N_IMAGE):
            r, c = divmod(patch, SIZE // PATCH)
            cell = np.s_[r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH]
            counts = [d[cell].sum() for d in drawn]
            best = int(np.argmax(counts))
            if counts[best] < 20:
                assert labels[patch].tolist() == [0, 0, 0]
            else:
                obj = example.objects[best]
                expected = [
                    1 + SHAPES.index(obj.shape),
                    1 + list(COLORS).index(obj.color),
                    1 + list(SIZES).index(obj.size),
                ]
                assert labels[patch].tolist() == expected
        assert (labels[:, 0] > 0).any(), "no patch holds an object"


def test_mentions_point_at_the_last_word_of_each_named_phrase(data, tokenizer):
    seen_absent = 0
    for i in range(60):
        example = generate_one(TASKS[i % 6], i // 6, 5, SIZE)
        item = data[i]
        tokens = tokenizer.convert_ids_to_tokens(item["ids"])
        named = dict(example.mentions)
        if example.task == "LogicalObj":
            phrases = re.fullmatch(r"Is there a (.+) or a (.+)\?", example.question).groups()
        else:
            phrases = [phrase for phrase, _ in example.mentions]
        assert len(item["mentions"]) == len(phrases)
        last = 0
        for phrase, (position, *labels) in zip(phrases, item["mentions"], strict=True):
            words = phrase.split()
            assert tokens[position - len(words) + 1 : position + 1] == words
            assert position > max(last, N_IMAGE)
            last = position
            if phrase in named:
                obj = example.objects[named[phrase]]
                assert labels == [*object_labels(obj, SIZE), 1]
                assert labels[3] == int(obj.x + obj.w / 2 > SIZE / 2)
            else:
                assert example.task == "LogicalObj" and labels == [IGNORE] * 4 + [0]
                seen_absent += 1
    assert seen_absent > 0


def test_probe_loss_is_finite_and_reaches_the_inputs(data, tokenizer):
    batch = collate([data[i] for i in range(12)], tokenizer.pad_token_id)
    torch.manual_seed(0)
    probes = Probes(16, 8)
    image_tokens = torch.randn(12, N_IMAGE, 16, requires_grad=True)
    hidden = torch.randn(12, batch["input_ids"].shape[1], 16, requires_grad=True)
    loss = probes.loss(image_tokens, hidden, batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert image_tokens.grad.abs().sum() > 0
    used = batch["mentions"][..., 0]
    rows, cols = torch.nonzero(hidden.grad.abs().sum(-1), as_tuple=True)
    expected = {(r, int(p)) for r in range(12) for p in used[r] if p >= 0}
    assert set(zip(rows.tolist(), cols.tolist(), strict=True)) == expected


def test_targets_teacher_force_every_answer_word_then_the_end(tokenizer):
    """One-word answers keep their two targets (the capitalised word, then </s>); a Describe
    answer's words are fed in and each is the target of the position before it."""
    data = ShapesQuestions(tokenizer, seed=5, size=SIZE, n_image=N_IMAGE,
                           tasks=("ChooseAttr", "Describe"))
    items = [data[i] for i in range(4)]
    batch = collate(items, tokenizer.pad_token_id)
    for row, item in enumerate(items):
        words = item["answer"].capitalize().split()
        at = len(item["ids"]) - 1
        wanted = [*words, "</s>"]
        targets = batch["targets"][row]
        assert tokenizer.convert_ids_to_tokens(targets[at:at + len(wanted)]) == wanted
        assert (targets[:at] == IGNORE).all() and (targets[at + len(wanted):] == IGNORE).all()
        fed = batch["input_ids"][row, at + 1:at + len(words)]
        assert tokenizer.convert_ids_to_tokens(fed) == words[:-1]
        assert batch["attention_mask"][row].sum() == at + 1 + len(words)  # prompt, answer
    assert [item["task"] for item in items] == ["ChooseAttr", "Describe"] * 2


def test_a_task_mix_draws_distinct_examples():
    from mmlens.zoo.train import task_mix, task_slot

    tasks = task_mix("ChooseAttr,Describe:3")
    assert tasks == ("ChooseAttr", "Describe", "Describe", "Describe")
    slots = [task_slot(tasks, i) for i in range(40)]
    assert sorted(i for t, i in slots if t == "Describe") == list(range(30))
    assert sorted(i for t, i in slots if t == "ChooseAttr") == list(range(10))
    with pytest.raises(SystemExit, match="Describe:x"):
        task_mix("Describe:x")
