"""Tiny LLaVA-OneVision models, tokenizers and processors, built offline in a second.

Tiles are 32 px with 8 px SigLIP patches (a 4 x 4 grid a tile, 16 features). The canvases
(height x width) are 32x64, 64x32, 64x64, 64x96 and 96x64, and ``anyres_max_2`` caps the
unpadded tile features at 2 tiles' worth: a 32x64 canvas (4 x 8 = 32 features) is kept as is,
a square image on the 64x64 canvas (8 x 8) is downscaled to 5 x 5, a wide one on 64x96 to 4 x 6.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

TILE, PATCH = 32, 8
PINPOINTS = [[32, 64], [64, 32], [64, 64], [64, 96], [96, 64]]
ASPECT = "anyres_max_2"
VOCAB = 128
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
IMAGE_TOKEN = SPECIALS.index("<image>")
VIDEO_TOKEN = SPECIALS.index("<video>")
QUESTIONS = ["What color is the square?", "Is the circle left or right of the square?",
             "Which shape is red?", "How many triangles are there?"]
# The chat template published with the llava-hf OneVision checkpoints: images first, then text.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_onevision_config(*, feature_layer: int | list = -1, strategy: str = "full",
                          n_kv_heads: int = 2, text_layers: int = 3, vision_layers: int = 3,
                          aspect: str = ASPECT, tile: int = TILE,
                          pinpoints: list[list[int]] | None = None) -> LlavaOnevisionConfig:
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
        num_attention_heads=4, image_size=tile, patch_size=PATCH, vision_use_head=False,
    )
    text = Qwen2Config(
        hidden_size=48, intermediate_size=96, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=n_kv_heads, vocab_size=VOCAB,
        max_position_embeddings=512, pad_token_id=0, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    return LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
        video_token_index=VIDEO_TOKEN, image_grid_pinpoints=pinpoints or PINPOINTS,
        vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
        vision_aspect_ratio=aspect,
    )


def tiny_onevision(seed: int = 0, **kwargs) -> LlavaOnevisionForConditionalGeneration:
    """A random LLaVA-OneVision with every weight perturbed, so norms and biases are not
    trivial (HF initialises the q/k/v biases to zero)."""
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(tiny_onevision_config(**kwargs))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
        for layer in model.model.language_model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.3)
    return model.eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Qwen2's chat specials and no BOS token."""
    tok = Tokenizer(models.WordLevel(unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=SPECIALS)
    corpus = [f"user assistant {q} Answer the question using a single word or phrase."
              for q in QUESTIONS]
    tok.train_from_iterator(corpus, trainer=trainer)
    assert tok.get_vocab_size() <= VOCAB, tok.get_vocab_size()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", padding_side="left",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )


def tiny_image_processor(
    pinpoints: list[list[int]] | None = None, tile: int = TILE,
) -> LlavaOnevisionImageProcessorPil:
    return LlavaOnevisionImageProcessorPil(
        size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints or PINPOINTS,
    )


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def tiny_processor(hf_config: LlavaOnevisionConfig | None = None):
    """mmlens's composed processor (HF's needs torchvision for its video processor)."""
    from mmlens.model.families.onevision import onevision_config, onevision_processor

    hf_config = hf_config or tiny_onevision_config()
    cfg = onevision_config(hf_config)
    image_processor = tiny_image_processor(hf_config.image_grid_pinpoints,
                                           hf_config.vision_config.image_size)
    return onevision_processor(tiny_tokenizer(), image_processor, cfg, CHAT_TEMPLATE)


def onevision_inputs(processor, sizes: list[tuple[int, int]],
                     questions: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Left-padded processor outputs for random images of the given (height, width) sizes."""
    from mmlens.inputs.templates import ONEVISION

    questions = questions or [QUESTIONS[i % len(QUESTIONS)] for i in range(len(sizes))]
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    return dict(processor(images=images, text=[ONEVISION.format(q) for q in questions],
                          padding=True, return_tensors="pt"))
