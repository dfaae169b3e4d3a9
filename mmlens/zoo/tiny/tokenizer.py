"""A word-level tokenizer trained in code, for the tiny checkpoints (no download)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

QUESTIONS = ("What color is the square?", "Is the circle left or right of the square?",
             "Which shape is red?", "How many triangles are there?")


def word_tokenizer(specials: Sequence[str], corpus: Sequence[str], *, vocab: int,
                   unk: str, bos: str | None = None, **kwargs: Any) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``corpus`` with ``specials`` first (their ids are
    their indices), left padding, and ``bos`` prepended when given; ``kwargs`` go to
    ``PreTrainedTokenizerFast`` (``eos_token``, ``pad_token``, ``extra_special_tokens``...)."""
    tok = Tokenizer(models.WordLevel(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(corpus) + list(QUESTIONS),
                            trainer=trainers.WordLevelTrainer(vocab_size=vocab,
                                                              special_tokens=list(specials)))
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    if tok.get_vocab_size() > vocab:
        raise ValueError(f"tiny vocabulary of {tok.get_vocab_size()} words exceeds {vocab}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, padding_side="left",
                                   **({"bos_token": bos} if bos else {}), **kwargs)
