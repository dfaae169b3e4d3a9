"""Shared helpers for the knockout, lens and patching tests: tiny models and batches with spans.

Imported explicitly by those test files (``from conftest_interventions import ...``).
"""

from __future__ import annotations

import torch
from tiny import IMAGE_TOKEN, VOCAB, tiny_inputs, tiny_llava

from mmlens import HookedMultimodalTransformer, MultimodalBatch


def tiny_pair(seed: int = 0, **kwargs) -> tuple[object, HookedMultimodalTransformer]:
    """A tiny HF LLaVA with eager attention and its hooked conversion."""
    hf = tiny_llava(seed=seed, **kwargs)
    hf.set_attn_implementation("eager")
    return hf, HookedMultimodalTransformer.from_hf_model(hf).eval()


def tiny_batch(config, batch: int = 1, pad: list[int] | None = None, seed: int = 1,
               prefix: int = 3, suffix: int = 6) -> MultimodalBatch:
    """``[pad, bos, prefix, image, suffix]`` rows with spans ``image``, ``question`` (the suffix
    but its last token), ``last``, ``bos``, ``text``."""
    inputs = tiny_inputs(config, batch=batch, pad=pad, seed=seed, prefix=prefix, suffix=suffix)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    spans = []
    for row in range(batch):
        real = mask[row].nonzero()[:, 0]
        image = (ids[row] == IMAGE_TOKEN).nonzero()[:, 0]
        after = torch.arange(int(image[-1]) + 1, ids.shape[1])
        spans.append({
            "image": image,
            "question": after[:-1],
            "last": after[-1:],
            "bos": real[:1],
            "text": real[ids[row, real] != IMAGE_TOKEN],
        })
    return MultimodalBatch(input_ids=ids, attention_mask=mask,
                           pixel_values=inputs["pixel_values"], spans=spans)


def hf_logits(hf, batch: MultimodalBatch, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of the HF model on a batch, with the position ids our model uses."""
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  pixel_values=batch.pixel_values if pixel_values is None else pixel_values,
                  position_ids=positions).logits


def tiny_tokenizer():
    """A word-level tokenizer over the tiny vocabulary: ``w{i}`` for id i, with ``yes`` (10),
    ``Yes`` (11), ``no`` (12), ``<image>`` (99)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(VOCAB)}
    words.update({"<unk>": 0, "<s>": 1, "</s>": 2, "yes": 10, "Yes": 11, "no": 12,
                  "<image>": IMAGE_TOKEN})
    vocab = {word: i for word, i in words.items() if f"w{i}" != word or i not in (
        0, 1, 2, 10, 11, 12, IMAGE_TOKEN)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")
