"""What the tiny Qwen2-VL and Qwen2.5-VL share: 4 px patches merged 2x2 into one token (8x8 px),
a 3-layer Qwen2 decoder with M-RoPE sections 2/2/2, Qwen's specials at fixed ids, and the
shapes-llava words so ``mmlens flow`` prompts tokenize."""

from __future__ import annotations

from typing import Any

from mmlens.core.sizes import ImageSize

IMAGE_SIZES = (ImageSize(45, 29), ImageSize(22, 38), ImageSize(32, 32), ImageSize(60, 20))
VOCAB = 120
IMAGE_TOKEN = 110
VIDEO_TOKEN = 111
VISION_START = 112
VISION_END = 113
PATCH = 4
MERGE = 2
TEMPORAL = 2
SPECIALS = {"<|endoftext|>": 100, "<|im_start|>": 101, "<|im_end|>": 102,
            "<|image_pad|>": IMAGE_TOKEN, "<|video_pad|>": VIDEO_TOKEN,
            "<|vision_start|>": VISION_START, "<|vision_end|>": VISION_END}
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The chat template Qwen2-VL and Qwen2.5-VL checkpoints ship."""


def text_config(text_layers: int, n_kv_heads: int) -> dict[str, Any]:
    return dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=n_kv_heads, vocab_size=VOCAB,
        max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "mrope_section": [2, 2, 2]},
    )


def token_ids() -> dict[str, int]:
    return dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
                vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)


def tokenizer() -> Any:
    """A word-level tokenizer with Qwen's special tokens at the tiny configs' ids; it knows the
    chat template's words and the shapes dataset's questions and answers."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mmlens.zoo.build import SPECIAL_TOKENS, WORD_PATTERN, vocabulary

    words = [w for w in vocabulary() if w not in SPECIAL_TOKENS]
    words += ["<unk>", "system", "You", "are", "user", "single", "phrase", "using", "or"]
    words = list(dict.fromkeys(words))
    if len(words) > min(SPECIALS.values()):
        raise ValueError(f"{len(words)} words overlap Qwen's special ids")
    vocab = {w: i for i, w in enumerate(words)}
    vocab |= {f"<unused{i}>": i for i in range(len(words), VOCAB) if i not in SPECIALS.values()}
    vocab |= SPECIALS
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed",
                                             invert=True)
    tok.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", padding_side="left", model_max_length=4096,
        chat_template=CHAT_TEMPLATE,
    )


def processor(hf_config: Any = None, *, min_pixels: int = 8 * 8 * 4,
              max_pixels: int = 8 * 8 * 64) -> Any:
    """Tokenizer + Qwen's PIL image processor at the tiny patch sizes (4 px, 2x2 merge)."""
    from transformers import Qwen2VLImageProcessorPil

    from mmlens.model.loading.qwen_processor import qwen_processor

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL,
        min_pixels=min_pixels, max_pixels=max_pixels)
    return qwen_processor(tokenizer(), image_processor)
