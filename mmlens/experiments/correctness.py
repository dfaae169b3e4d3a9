"""The correctness filter, one for the whole study: greedy answer vs gold, ``strip().lower()``.

The greedy answer is decoded for at most ``FILTER_MAX_NEW_TOKENS`` tokens (the paper's 128,
a setting: ``--filter-max-new-tokens``), and no further once it cannot equal the gold answer
or the model ends it, so the cap costs nothing on short answers.
"""

from __future__ import annotations

from mmlens.experiments.engine import CleanRun, greedy_continue
from mmlens.model.protocol import HookedModel

FILTER_MAX_NEW_TOKENS = 128


def model_answer(model: HookedModel, clean: CleanRun, token: int, gold: str,
                 max_new_tokens: int) -> str:
    """The greedy answer text, decoding no further once it cannot equal ``gold``."""
    tokenizer = model.tokenizer
    target = gold.strip().lower()

    def hopeless(tokens: list[int]) -> bool:
        text = tokenizer.decode(tokens, skip_special_tokens=True).strip().lower()
        return not text.endswith("\ufffd") and not target.startswith(text)

    tokens = greedy_continue(model, clean, token, max_new_tokens=max_new_tokens,
                             eos_token_id=tokenizer.eos_token_id, stop=hopeless)
    return tokenizer.decode(tokens, skip_special_tokens=True)


def wrong_answer_reason(said: str, gold: str) -> str | None:
    """Why an answer fails the filter (None when it passes)."""
    if said.strip().lower() == gold.strip().lower():
        return None
    return f"wrong answer {said.strip()!r} (gold {gold!r})"
