"""Tiny LLaVA-NeXT models, tokenizers and processors, built offline in a second.

Tiles are 32 px with 8 px patches (a 4 x 4 grid a tile); the canvases are 32x64, 64x32 and
64x64 (height x width), so an image gives 1 base tile plus 2 or 4 high-resolution tiles.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)

from mmlens.inputs.templates import LLAMA3, VICUNA_V1

TILE, PATCH = 32, 8
PINPOINTS = [[32, 64], [64, 32], [64, 64]]
VOCAB = 128
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
IMAGE_TOKEN = SPECIALS.index("<image>")
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
QUESTIONS = ["What color is the square?", "Is the circle left or right of the square?",
             "Which shape is red?", "How many triangles are there?"]


def tiny_next_config(*, pinpoints: list[list[int]] | None = None, feature_layer: int | list = -2,
                     strategy: str = "default", n_kv_heads: int = 2, text_layers: int = 3,
                     rope_parameters: dict | None = None) -> LlavaNextConfig:
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=TILE, patch_size=PATCH, projection_dim=16,
    )
    text_kwargs = dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=n_kv_heads, vocab_size=VOCAB,
        max_position_embeddings=512, pad_token_id=SPECIALS.index("<pad>"),
    )
    if rope_parameters is not None:
        text_kwargs["rope_parameters"] = rope_parameters
    return LlavaNextConfig(
        vision_config=vision, text_config=LlamaConfig(**text_kwargs),
        image_token_index=IMAGE_TOKEN, image_grid_pinpoints=pinpoints or PINPOINTS,
        vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
    )


def tiny_next(seed: int = 0, **kwargs) -> LlavaNextForConditionalGeneration:
    """A random LLaVA-NeXT with every weight perturbed, so norms and biases are not trivial."""
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(tiny_next_config(**kwargs))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def tiny_tokenizer(llama3: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on the prompt template and a few questions."""
    template = LLAMA3 if llama3 else VICUNA_V1
    specials = SPECIALS + (LLAMA3_SPECIALS if llama3 else [])
    bos = "<|begin_of_text|>" if llama3 else "<s>"
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=specials)
    corpus = [template.text.replace("<image>", "").replace("{question}", q) for q in QUESTIONS]
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    assert tok.get_vocab_size() <= VOCAB, tok.get_vocab_size()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", padding_side="left", extra_special_tokens={"image_token": "<image>"},
    )


def tiny_image_processor(pinpoints: list[list[int]] | None = None) -> LlavaNextImageProcessorPil:
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
        image_grid_pinpoints=pinpoints or PINPOINTS,
    )


def tiny_processor(llama3: bool = False,
                   pinpoints: list[list[int]] | None = None) -> LlavaNextProcessor:
    return LlavaNextProcessor(
        image_processor=tiny_image_processor(pinpoints), tokenizer=tiny_tokenizer(llama3),
        patch_size=PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def next_inputs(processor: LlavaNextProcessor, sizes: list[tuple[int, int]],
                questions: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Left-padded processor outputs for random images of the given (height, width) sizes."""
    template = LLAMA3 if "<|eot_id|>" in processor.tokenizer.get_vocab() else VICUNA_V1
    questions = questions or [QUESTIONS[i % len(QUESTIONS)] for i in range(len(sizes))]
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    return dict(processor(images=images, text=[template.format(q) for q in questions],
                          padding=True, return_tensors="pt"))
