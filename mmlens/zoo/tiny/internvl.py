"""A tiny InternVL 3 (``InternVLForConditionalGeneration``): a 3-layer InternViT (24 px tiles of
4 px patches, a class token, learned positions, layer scale), pixel shuffle (2x2 patches into one
of 9 image tokens a tile), the LayerNorm + MLP projector and a 3-layer Qwen2 decoder
(grouped-query attention, q/k/v biases, tied embeddings); images cut into up to 6 tiles plus a
thumbnail by the GotOcr2 PIL image processor; a word-level tokenizer with InternVL's specials
and the shapes dataset's words."""

from __future__ import annotations

from typing import Any

from mmlens.core.sizes import ImageSize
from mmlens.zoo.tiny.tokenizer import word_tokenizer

HF_CLASS = "InternVLForConditionalGeneration"
# 2x1 tiles + thumbnail, 1x2 tiles + thumbnail, 2x2 tiles + thumbnail
IMAGE_SIZES = (ImageSize(61, 29), ImageSize(27, 53), ImageSize(50, 50))

VARIANTS = {
    "rms-norm-no-qkv-bias": dict(vision_config={"norm_type": "rms_norm",
                                                "attention_bias": False}),
    "final-norm": dict(vision_config={"use_mean_pooling": False}),
    "second-to-last-layer": dict(vision_feature_layer=-2),
    "untied-mha-decoder": dict(tie_word_embeddings=False,
                               text_config={"tie_word_embeddings": False,
                                            "num_key_value_heads": 4}),
}
"""hf_config overrides the conformance suite checks for parity: RMSNorm without q/k/v biases,
the tower's final norm, another feature layer, an untied multi-head decoder."""

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
            "<video>", "<unk>")
NAMED = {"start_image_token": "<img>", "end_image_token": "</img>",
         "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
"""The tokenizer attributes HF's ``InternVLProcessor`` reads, as the published tokenizer has."""
VOCAB = 128
TILE = 24
PATCH = 4
MAX_TILES = 6
IMAGE_SEQ_LENGTH = (TILE // PATCH // 2) ** 2
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<IMG_CONTEXT>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""InternVL 3's chat template for images and text (no default system prompt)."""


def hf_config(**overrides: Any) -> Any:
    """The tiny ``InternVLConfig``; ``overrides`` replace top-level fields, ``text_config`` /
    ``vision_config`` dicts update the towers' fields."""
    from transformers import InternVLConfig

    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, image_size=TILE, patch_size=PATCH, attention_bias=True,
                  layer_scale_init_value=0.1, norm_type="layer_norm", layer_norm_eps=1e-6,
                  hidden_act="gelu")
    vision.update(overrides.pop("vision_config", {}))
    text = dict(model_type="qwen2", hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                max_position_embeddings=1024, rms_norm_eps=1e-6, pad_token_id=0,
                eos_token_id=SPECIALS.index("<|im_end|>"), tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    text.update(overrides.pop("text_config", {}))
    fields = dict(vision_config=vision, text_config=text,
                  image_token_id=SPECIALS.index("<IMG_CONTEXT>"),
                  image_seq_length=IMAGE_SEQ_LENGTH, downsample_ratio=0.5,
                  projector_hidden_act="gelu", vision_feature_layer=-1,
                  vision_feature_select_strategy="default", tie_word_embeddings=True)
    fields.update(overrides)
    return InternVLConfig(**fields)


def tokenizer() -> Any:
    """Word-level, InternVL's special tokens first (their ids are the config's), left padding."""
    from mmlens.zoo.build import SPECIAL_TOKENS, vocabulary

    words = [w for w in vocabulary() if w not in SPECIAL_TOKENS]
    corpus = [" ".join(words), "system You are a helpful assistant user single phrase using or"]
    return word_tokenizer(SPECIALS, corpus, vocab=VOCAB, unk="<unk>", eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", model_max_length=4096,
                          chat_template=CHAT_TEMPLATE, extra_special_tokens=NAMED)


def processor(hf_config: Any = None) -> Any:
    """The tokenizer and the GotOcr2 PIL image processor (tiles and a thumbnail) at the tiny
    sizes, composed without a video processor (``mmlens.model.loading.internvl_processor``)."""
    from transformers import GotOcr2ImageProcessorPil

    from mmlens.model.loading.internvl_processor import internvl_processor

    image_processor = GotOcr2ImageProcessorPil(
        size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1,
        max_patches=MAX_TILES, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    seq = IMAGE_SEQ_LENGTH if hf_config is None else hf_config.image_seq_length
    return internvl_processor(tokenizer(), image_processor, seq, CHAT_TEMPLATE)
