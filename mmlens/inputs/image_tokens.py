"""The original LLaVA's ``tokenizer_image_token``: text around ``<image>`` tokenized in chunks.

    ids, offsets = chunked_encoding(tokenizer, "USER: <image>\\nWhat is it?", image_token_id, 576)

The text before and after the image placeholder is tokenized as separate strings, so a
SentencePiece tokenizer starts the second chunk with its word-start marker (``"▁"``), which
tokenizing the whole prompt would not produce. Each chunk gets the tokenizer's own BOS; only
the first chunk keeps it (one BOS in all). ``tokenization="whole"`` (the Hugging Face
processor's way) tokenizes the prompt with the placeholder expanded in place.
"""

from __future__ import annotations

from typing import Any

from mmlens.inputs.templates import IMAGE_PLACEHOLDER

TOKENIZATIONS: tuple[str, ...] = ("whole", "chunks")


def chunked_encoding(tokenizer: Any, prompt: str, image_token_id: int, n_image_tokens: int
                     ) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets (into ``prompt``) of the chunked tokenization.

    The placeholder becomes ``n_image_tokens`` copies of ``image_token_id`` with empty offsets.
    """
    chunks = prompt.split(IMAGE_PLACEHOLDER)
    if len(chunks) != 2:
        raise ValueError(f"the prompt holds {len(chunks) - 1} {IMAGE_PLACEHOLDER} placeholders: "
                         "chunked tokenization needs exactly one")
    bos = tokenizer.bos_token_id
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    start = 0
    for index, chunk in enumerate(chunks):
        encoded = tokenizer(chunk, return_offsets_mapping=True)
        chunk_ids, chunk_offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
        # tokenizer_image_token keeps the first chunk's BOS and drops it from the others
        if index > 0 and chunk_ids and bos is not None and chunk_ids[0] == bos:
            chunk_ids, chunk_offsets = chunk_ids[1:], chunk_offsets[1:]
        if index > 0:
            ids.extend([image_token_id] * n_image_tokens)
            offsets.extend([(0, 0)] * n_image_tokens)
        ids.extend(chunk_ids)
        offsets.extend((a + start, b + start) if b > a else (0, 0) for a, b in chunk_offsets)
        start += len(chunk) + len(IMAGE_PLACEHOLDER)
    return ids, offsets


def tokenized_text(prompt: str, tokenizer: Any, image_token_id: int, n_image_tokens: int,
                   tokenization: str) -> str:
    """The text the tokenizer received for ``prompt`` (one ``<image>`` placeholder).

    ``"whole"``: the placeholder expanded to the image token's own string once per image
    token, as the processor does (Qwen-VL's ``<|image_pad|>``, LLaVA's ``<image>``);
    ``"chunks"``: the prompt itself, whose placeholder the image ids replace.
    """
    if tokenization == "chunks" or prompt.count(IMAGE_PLACEHOLDER) != 1:
        return prompt
    image_str = tokenizer.convert_ids_to_tokens(image_token_id)
    return prompt.replace(IMAGE_PLACEHOLDER, image_str * n_image_tokens)
