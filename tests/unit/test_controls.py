"""Random controls draw from the source's kind of positions, never BOS, the last position or the
target, reproducibly from their own seed."""

import torch

from mmlens.experiments.controls import control_seed_of, control_spans
from mmlens.experiments.knockouts import parse_flows

# [BOS, 3 system, 8 image (one newline), 4 question, 2 suffix, last]
SPANS = {"bos": torch.tensor([0]), "system": torch.arange(1, 4), "image": torch.arange(4, 12),
         "image_newline": torch.tensor([11]), "related": torch.tensor([5, 6]),
         "question": torch.arange(12, 16), "suffix": torch.tensor([16, 17]),
         "last": torch.tensor([18]),
         "text": torch.tensor([0, 1, 2, 3, 12, 13, 14, 15, 16, 17, 18])}
FLOWS = parse_flows(["question->last", "related->question", "last->last"])


def _draws(seed: int, n: int = 200) -> list[dict[str, list[int]]]:
    draws = []
    for index in range(n):
        spans, controls = control_spans(FLOWS, SPANS, example_id=f"q{index}", seed=seed)
        draws.append({c.source: spans[c.source].tolist() for c in controls})
    return draws


def test_text_controls_never_draw_bos_the_last_position_or_the_target():
    prompt = {1, 2, 3, 12, 13, 14, 15, 16, 17}  # system, question, suffix
    for draw in _draws(0):
        assert len(draw["random_question"]) == 4 and set(draw["random_question"]) <= prompt
        assert len(draw["random_last"]) == 1 and set(draw["random_last"]) <= prompt
        # an image source draws image positions, never the newline, never its target
        assert len(draw["random_related"]) == 2
        assert set(draw["random_related"]) <= set(range(4, 11))
    # every allowed position is drawn at some point: the pool is the whole prompt text
    assert set().union(*(d["random_question"] for d in _draws(0))) == prompt


def test_the_control_seed_alone_moves_the_draws():
    assert _draws(0) == _draws(0)
    assert _draws(0) != _draws(1)
    assert control_seed_of(True, None, 7) == 7 and control_seed_of(True, 3, 7) == 3
    assert control_seed_of(False, 3, 7) is None
