"""What the training script feeds the model: shapes questions encoded for LLaVA, in batches.

``ShapesQuestions`` draws examples of a task mix (``task_mix``, ``task_slot``) and encodes each
with its answer's tokens (``answer_tokens``: one word or several, then ``</s>``), its patches'
and named phrases' labels for the training probes; ``collate`` right-pads them into a
teacher-forced batch whose ``targets`` are the answer's tokens.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerFast

from mmlens.data.example import TASKS
from mmlens.data.shapes import DEFAULT_N_OBJECTS, generate_one
from mmlens.data.shapes_questions import ANSWERS
from mmlens.zoo.build import PROMPT_TEMPLATE
from mmlens.zoo.probes import IGNORE, object_labels, patch_labels


def answer_tokens(tokenizer: PreTrainedTokenizerFast, answer: str) -> list[int]:
    """Ids of the capitalised answer ("small red circle" -> Small, red, circle), then ``</s>``."""
    ids = tokenizer(answer.capitalize(), add_special_tokens=False).input_ids
    if tokenizer.unk_token_id in ids:
        raise ValueError(f"answer {answer!r} has a word the tokenizer lacks")
    return [*ids, tokenizer.eos_token_id]


def task_slot(tasks: tuple[str, ...], i: int) -> tuple[str, int]:
    """Item ``i`` of a dataset cycling over ``tasks``: its task and index within that task.

    A task named k times in ``tasks`` takes k of every ``len(tasks)`` items, on distinct indices.
    """
    slot, turn = i % len(tasks), i // len(tasks)
    task = tasks[slot]
    return task, turn * tasks.count(task) + tasks[:slot].count(task)


def task_mix(text: str) -> tuple[str, ...]:
    """``"A,B:3"`` -> ``("A", "B", "B", "B")``: each task as often as it is to be drawn."""
    tasks: list[str] = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, _, count = entry.partition(":")
        if name not in ANSWERS or (count and not count.isdigit()):
            raise SystemExit(f"--tasks {entry!r}: use task names ({', '.join(ANSWERS)}), each "
                             "optionally followed by :k to draw it k times as often")
        tasks += [name] * int(count or 1)
    return tuple(tasks)


class ShapesQuestions(Dataset):
    """Item ``i``: example of ``task_slot(tasks, i)`` of ``seed``, encoded for LLaVA.

    Returns a dict: ``pixels [3, H, W]`` uint8, ``ids`` (the prompt's token ids with the image
    token expanded), ``answer`` (lowercase), ``answer_ids`` (``answer_tokens``),
    ``patches [n_image, 3]`` (``patch_labels``) and
    ``mentions``: per phrase naming an object, ``(position in ids, shape, color, size, side,
    exists)`` (``object_labels``; attributes ``IGNORE`` for a phrase naming nothing).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        seed: int,
        size: int,
        n_image: int,
        ramp: int = 0,
        tasks: tuple[str, ...] = TASKS,
    ):
        self.tokenizer, self.seed, self.size, self.n_image = tokenizer, seed, size, n_image
        self.ramp, self.tasks = ramp, tuple(tasks)
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")
        self.grid = math.isqrt(n_image)

    def n_objects(self, i: int) -> tuple[int, int]:
        """Objects per scene of item ``i``: at most 1 at first, growing to 5 over ``ramp`` items.

        Scenes of one object can be answered from the whole image; they teach the vision tower
        colours, shapes, sizes and sides before questions need the named object found.
        """
        low, high = DEFAULT_N_OBJECTS
        if self.ramp == 0:
            return low, high
        return 1, 1 + min(high - 1, (high * i) // self.ramp)

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, i: int) -> dict:
        task, index = task_slot(self.tasks, i)
        example = generate_one(task, index, self.seed, self.size, self.n_objects(i))
        prompt = PROMPT_TEMPLATE.format(question=example.question)
        encoded = self.tokenizer(prompt, return_offsets_mapping=True)
        ids = encoded.input_ids
        at = ids.index(self.image_id)
        ids = ids[:at] + [self.image_id] * self.n_image + ids[at + 1 :]
        pixels = torch.from_numpy(np.array(example.image, dtype=np.uint8)).permute(2, 0, 1)
        # the token ending each phrase that names an object, in the expanded sequence, with
        # the object's labels; a phrase naming nothing in the scene (LogicalObj) gets only
        # "exists" = 0
        ends = [b for _, b in encoded.offset_mapping]
        named = dict(example.mentions)
        phrases = list(named)
        if task == "LogicalObj":
            phrases = list(re.fullmatch(r"Is there a (.+) or a (.+)\?", example.question).groups())
        start, mentions = prompt.index(example.question), []
        for phrase in phrases:
            start = prompt.index(phrase, start) + len(phrase)
            position = ends.index(start) + self.n_image - 1
            if phrase in named:
                labels = (*object_labels(example.objects[named[phrase]], self.size), 1)
            else:
                labels = (IGNORE,) * 4 + (0,)
            mentions.append((position, *labels))
        return {
            "pixels": pixels,
            "ids": ids,
            "task": task,
            "answer": example.answer,
            "answer_ids": answer_tokens(self.tokenizer, example.answer),
            "patches": patch_labels(example, self.size, self.size // self.grid),
            "mentions": mentions,
        }


def collate(items: list[dict], pad_id: int) -> dict:
    """Right-padded batch of prompts followed by their answers (teacher forcing).

    ``answer_at [B]`` is the position whose next token is the answer's first, ``answer [B]``
    that token; ``targets [B, T]`` holds at each answer position the next token (the answer's
    words, then ``</s>``) and ``IGNORE`` elsewhere.

    ``mentions [B, 2, 6]`` holds (position, shape, color, size, side, exists) of each phrase
    of the question that names an object, padded with -1 positions.
    """
    ids = [item["ids"] for item in items]
    length = max(len(item["ids"]) + len(item["answer_ids"]) - 1 for item in items)
    input_ids = torch.full((len(ids), length), pad_id)
    mask = torch.zeros((len(ids), length), dtype=torch.long)
    targets = torch.full((len(ids), length), IGNORE)
    mentions = torch.full((len(ids), 2, 6), -1)
    for row, item in enumerate(items):
        x, answer = item["ids"], item["answer_ids"]
        sequence = [*x, *answer[:-1]]
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
        targets[row, len(x) - 1 : len(sequence)] = torch.tensor(answer)
        for k, labels in enumerate(item["mentions"]):
            mentions[row, k] = torch.tensor(labels)
    return {
        "pixels": torch.stack([item["pixels"] for item in items]),
        "input_ids": input_ids,
        "attention_mask": mask,
        "answer_at": torch.tensor([len(x) - 1 for x in ids]),
        "answer": torch.tensor([item["answer_ids"][0] for item in items]),
        "targets": targets,
        "answers": [item["answer"] for item in items],
        "patches": torch.stack([item["patches"] for item in items]),
        "mentions": mentions,
    }
