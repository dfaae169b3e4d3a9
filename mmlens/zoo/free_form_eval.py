"""Held-out accuracy of the bundled model on a free-form task: greedy decoding of the answer.

``evaluate_free_form`` decodes each question's answer greedily (up to the reference's length
plus one token, stopping at ``</s>``) and scores the whole answer (exact match, lowercase) and
each word of the reference at its place.
"""

from __future__ import annotations

import torch

from mmlens.zoo.build import CLIP_MEAN, CLIP_STD


@torch.no_grad()
def greedy_answers(
    model, tokenizer, items: list[dict], device: str, max_new_tokens: int
) -> list[str]:
    """The greedily decoded answer of each item (``ids`` and ``pixels`` of ``ShapesQuestions``)."""
    pixels = torch.stack([item["pixels"] for item in items]).to(device).float() / 255
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    pixel_values = (pixels - mean) / std
    sequences = [list(item["ids"]) for item in items]
    done = [False] * len(items)
    answers: list[list[int]] = [[] for _ in items]
    for _ in range(max_new_tokens):
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(items), length), tokenizer.pad_token_id)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        logits = model(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            pixel_values=pixel_values,
        ).logits
        last = torch.tensor([len(s) - 1 for s in sequences], device=device)
        tokens = logits[torch.arange(len(items), device=device), last].argmax(-1).tolist()
        for row, token in enumerate(tokens):
            if done[row]:
                continue
            if token == tokenizer.eos_token_id:
                done[row] = True
                continue
            answers[row].append(token)
            sequences[row].append(token)
        if all(done):
            break
    return [tokenizer.decode(a).strip().lower() for a in answers]


def evaluate_free_form(
    model, tokenizer, data, n: int, device: str, task: str, batch_size: int = 64
) -> dict[str, float]:
    """``{task: exact match, task/word: per-word accuracy}`` over items ``0 .. n-1`` of ``data``."""
    exact = words = total_words = 0
    for start in range(0, n, batch_size):
        items = [data[i] for i in range(start, min(n, start + batch_size))]
        longest = max(len(item["answer_ids"]) for item in items)
        for item, answer in zip(
            items, greedy_answers(model, tokenizer, items, device, longest), strict=True
        ):
            reference, decoded = item["answer"].split(), answer.split()
            exact += decoded == reference
            words += sum(a == b for a, b in zip(reference, decoded, strict=False))
            total_words += len(reference)
    return {task: exact / n, f"{task}/word": words / total_words}
