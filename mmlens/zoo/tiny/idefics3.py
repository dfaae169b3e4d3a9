"""A tiny Idefics3 (``Idefics3ForConditionalGeneration``): a 3-layer vision transformer on
24 px tiles of 4 px patches (a 6x6 grid, pixel-shuffled 2x2 into 9 image tokens a tile), a
3-layer Llama decoder with grouped-query attention; images resized to a 72 px longest edge, so
an image is split into up to 3x3 tiles plus the global view; a word-level tokenizer with
Idefics3's specials (``<fake_token_around_image>``, ``<global-img>``, ``<row_i_col_j>``) and
the shapes dataset's words."""

from __future__ import annotations

from typing import Any

from mmlens.core.sizes import ImageSize
from mmlens.zoo.tiny.tokenizer import word_tokenizer

HF_CLASS = "Idefics3ForConditionalGeneration"
IMAGE_SIZES = (ImageSize(45, 29), ImageSize(22, 38), ImageSize(40, 40))

TILE = 24
PATCH = 4
SCALE = 2
LONGEST_EDGE = 3 * TILE
TOKENS_PER_TILE = (TILE // PATCH // SCALE) ** 2
ROW_COL = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>",
            "<fake_token_around_image>", "<global-img>", "<unk>", *ROW_COL)
VOCAB = 160
VARIANTS = {  # hf_config overrides the conformance suite checks parity on, beside the default
    "scale-3-mha-biases": dict(scale_factor=3, text_config={"num_key_value_heads": 4,
                                                            "attention_bias": True}),
    "tied-embeddings-gelu": dict(tie_word_embeddings=True,
                                 vision_config={"hidden_act": "gelu"}),
}
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
"""SmolVLM's chat template for images and text."""


def config_fields(overrides: dict[str, Any]) -> dict[str, Any]:
    """The tiny config's fields; `overrides` as `hf_config`'s (popped from the dict)."""
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, image_size=TILE, patch_size=PATCH,
                  layer_norm_eps=1e-6)
    vision.update(overrides.pop("vision_config", {}))
    text = dict(model_type="llama", hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=12, vocab_size=VOCAB,
                max_position_embeddings=1024, rms_norm_eps=1e-5, pad_token_id=0,
                bos_token_id=SPECIALS.index("<|im_start|>"),
                eos_token_id=SPECIALS.index("<end_of_utterance>"))
    text.update(overrides.pop("text_config", {}))
    fields = dict(vision_config=vision, text_config=text, scale_factor=SCALE,
                  image_token_id=SPECIALS.index("<image>"), pad_token_id=0,
                  tie_word_embeddings=False)
    fields.update(overrides)
    return fields


def hf_config(**overrides: Any) -> Any:
    """The tiny ``Idefics3Config``; ``overrides`` replace top-level fields, ``text_config`` /
    ``vision_config`` dicts update the towers' fields."""
    from transformers import Idefics3Config

    return Idefics3Config(**config_fields(dict(overrides)))


def tokenizer() -> Any:
    """Word-level, Idefics3's special tokens first (their ids are the config's), left padding;
    ``<|im_start|>`` is the BOS token, written by the chat template, not added."""
    from mmlens.zoo.build import SPECIAL_TOKENS, vocabulary

    words = [w for w in vocabulary() if w not in SPECIAL_TOKENS]
    corpus = [" ".join(words), "User : Assistant : single phrase using or"]
    return word_tokenizer(SPECIALS, corpus, vocab=VOCAB, unk="<unk>", bos_token="<|im_start|>",
                          eos_token="<end_of_utterance>", pad_token="<|endoftext|>",
                          model_max_length=4096, chat_template=CHAT_TEMPLATE)


def image_processor(cls_name: str = "Idefics3ImageProcessorPil") -> Any:
    """The PIL image processor at the tiny sizes (no torchvision needed)."""
    import transformers

    return getattr(transformers, cls_name)(
        size={"longest_edge": LONGEST_EDGE}, max_image_size={"longest_edge": TILE},
        image_mean=[0.5] * 3, image_std=[0.5] * 3)


def tokens_per_tile(hf_config: Any = None) -> int:
    """Image tokens a tile under ``hf_config`` (its patch size and scale factor)."""
    if hf_config is None:
        return TOKENS_PER_TILE
    return (TILE // hf_config.vision_config.patch_size // int(hf_config.scale_factor)) ** 2


def processor(hf_config: Any = None) -> Any:
    """HF's ``Idefics3Processor`` over the tokenizer and the PIL image processor, writing the
    tokens a tile ``hf_config`` makes."""
    from transformers import Idefics3Processor

    return Idefics3Processor(image_processor(), tokenizer(),
                             image_seq_len=tokens_per_tile(hf_config),
                             chat_template=CHAT_TEMPLATE)


def hf_vision_layers(hf: Any) -> list[Any]:
    """HF's vision-tower blocks (``model.vision_model.encoder.layers``)."""
    return list(hf.model.vision_model.encoder.layers)


def hf_decoder_layers(hf: Any) -> list[Any]:
    """HF's decoder layers (``model.text_model.layers``)."""
    return list(hf.model.text_model.layers)
