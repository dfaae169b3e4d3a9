"""The answer and its wrong option in the surface form of the token the model produced.

    answer, foil = paired_tokens(model.tokenizer, token, gold="red", wrong="green")

``logit-diff`` compares the answer's logit with the wrong option's, so both must be in the
same form (case, and a leading space where the tokenizer marks one) as the token the model
produced: ``Red`` against ``Green``, never against ``green``. The form is the one in which the
gold answer's first token is the produced token; where none is (the model said something
else, kept under ``only_correct=False``), the form is read off the produced token itself. The
answer is always the gold answer's token, never the wrong option's.
"""

from __future__ import annotations

from typing import Any

CASES = {"lower": str.lower, "capitalised": str.capitalize}
SPACES = ("", " ")
SPACE_MARKS = ("\u2581", "\u0120", " ")  # sentencepiece's and byte-level BPE's word starts


def _first(tokenizer: Any, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if ids else None


def _spaced(tokenizer: Any, token: int | None) -> bool:
    piece = tokenizer.convert_ids_to_tokens(token) if token is not None else ""
    return str(piece or "")[:1] in SPACE_MARKS


def answer_form(tokenizer: Any, token: int, gold: str) -> tuple[str, str]:
    """``(case, space)`` in which ``gold``'s first token is ``token``, else those of the
    produced token's own text."""
    forms = [(case, space) for space in SPACES for case in CASES]
    for case, space in forms:
        if _first(tokenizer, space + CASES[case](gold)) == token:
            return case, space
    letters = [c for c in tokenizer.decode([token]) if c.isalpha()]
    case = "capitalised" if letters and letters[0].isupper() else "lower"
    spaced = _spaced(tokenizer, token)
    # the spacing whose gold token carries the produced token's word-start mark
    space = next((s for s in SPACES
                  if _spaced(tokenizer, _first(tokenizer, s + CASES[case](gold))) == spaced), "")
    return case, space


def paired_tokens(tokenizer: Any, token: int, gold: str, wrong: str | None
                  ) -> tuple[int | None, int | None]:
    """``(answer id, wrong option id)``: the first tokens of ``gold`` and ``wrong`` in the form
    of the produced ``token``; the wrong option's is None when there is none or it starts
    with the same token as the answer (no difference to measure)."""
    gold = gold.strip()
    case, space = answer_form(tokenizer, token, gold)
    answer = _first(tokenizer, space + CASES[case](gold))
    if not wrong or not wrong.strip():
        return answer, None
    foil = _first(tokenizer, space + CASES[case](wrong.strip()))
    return answer, (foil if foil != answer else None)
