"""A tiny Llama-3.2-Vision (``MllamaForConditionalGeneration``): 16 px tiles of 4 px patches
(16 patches and a class token per tile, padded to 24 rows), at most 2 tiles per image, a
3-layer local and a 2-layer gated global vision transformer (local layers 0 and 2
concatenated to the output); a 4-layer decoder with grouped-query attention whose layers 1
and 2 are gated cross-attention layers (0 and 3 self-attention); a word-level tokenizer
whose ``<|image|>`` token is past the logits, as in the real checkpoints (the embedding has 8
extra rows)."""

from __future__ import annotations

from functools import cache
from typing import Any

from mmlens.core.sizes import ImageSize
from mmlens.zoo.tiny.llava import LLAMA3_ROPE

HF_CLASS = "MllamaForConditionalGeneration"
IMAGE_SIZES = (ImageSize(45, 19), ImageSize(13, 30), ImageSize(21, 21))
PER_PROMPT_IMAGES = True
"""The processor takes ``images=`` as one list per prompt."""

SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>", "<unk>")
VOCAB = 120
TILE = 16
PATCH = 4
MAX_TILES = 2
VARIANTS = {  # hf_config overrides the conformance suite checks parity on, beside the default
    "mha-llama3-rope": dict(text_config=dict(num_key_value_heads=4, rope_parameters=LLAMA3_ROPE)),
    "cross-first-and-last": dict(text_config=dict(num_hidden_layers=5,
                                                  cross_attention_layers=[0, 4])),
    "four-tiles-one-intermediate": dict(vision_config=dict(
        max_num_tiles=4, intermediate_layers_indices=[1], vision_output_dim=64,
        supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1],
                                 [4, 1]])),  # the processor's order for 4 tiles
}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
    "<|end_header_id|>\n\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|image|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
"""Llama-3.2-Vision's chat template for images and text (no system prompt)."""


@cache
def _tokenizer_size() -> int:
    return len(tokenizer()) - 1


def hf_config(**overrides: Any) -> Any:
    """The tiny ``MllamaConfig``; ``text_config`` / ``vision_config`` dicts update the towers'
    fields, other ``overrides`` the top-level ones."""
    from transformers import MllamaConfig

    vision = dict(hidden_size=32, attention_heads=4, intermediate_size=48, num_hidden_layers=3,
                  num_global_layers=2, image_size=TILE, patch_size=PATCH,
                  max_num_tiles=MAX_TILES, intermediate_layers_indices=[0, 2],
                  supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]], vision_output_dim=96,
                  norm_eps=1e-5)
    vision.update(overrides.pop("vision_config", {}))
    text = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=_tokenizer_size(),
                cross_attention_layers=[1, 2], max_position_embeddings=512, rms_norm_eps=1e-5,
                pad_token_id=SPECIALS.index("<|finetune_right_pad_id|>"),
                bos_token_id=0, eos_token_id=SPECIALS.index("<|eot_id|>"),
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    text.update(overrides.pop("text_config", {}))
    fields = dict(vision_config=vision, text_config=text, image_token_index=_tokenizer_size())
    fields.update(overrides)
    return MllamaConfig(**fields)


def tokenizer() -> Any:
    """Word-level with Llama 3's specials first; ``<|image|>`` added last (id = vocab size)."""
    from mmlens.zoo.build import SPECIAL_TOKENS, vocabulary
    from mmlens.zoo.tiny.tokenizer import word_tokenizer

    words = [w for w in vocabulary() if w not in SPECIAL_TOKENS]
    corpus = [" ".join(words), "user assistant system single phrase using or"]
    tok = word_tokenizer(SPECIALS, corpus, vocab=VOCAB, unk="<unk>", bos_token="<|begin_of_text|>",
                         eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>",
                         model_max_length=4096, chat_template=CHAT_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": ["<|image|>"]})
    return tok


def processor(hf_config: Any = None) -> Any:
    """The tokenizer and Mllama's PIL image processor at the tiny tile size."""
    from transformers import MllamaImageProcessorPil, MllamaProcessor

    max_tiles = MAX_TILES if hf_config is None else hf_config.vision_config.max_num_tiles
    image_processor = MllamaImageProcessorPil(
        size={"height": TILE, "width": TILE}, max_image_tiles=max_tiles,
        image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return MllamaProcessor(image_processor, tokenizer(), chat_template=CHAT_TEMPLATE)


def hf_tower_slots(hf: Any, n_seq: int) -> range | list[int]:
    """The tower positions of an image's keys: per tile (``n_seq`` positions over the tiles,
    each padded to a multiple of 8 rows) its class token and patches, not its padding rows."""
    vc = hf.config.vision_config
    n_tokens = (vc.image_size // vc.patch_size) ** 2 + 1
    n_padded = -(-n_tokens // 8) * 8
    return [t * n_padded + k for t in range(n_seq // n_padded) for k in range(n_tokens)]


def hf_vision_layers(hf: Any) -> list:
    """HF's vision blocks: the local transformer's, then the global one's."""
    vision = hf.model.vision_model
    return [*vision.transformer.layers, *vision.global_transformer.layers]
