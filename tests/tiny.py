"""Tiny randomly initialised Hugging Face LLaVA models and inputs, built offline in seconds."""

from __future__ import annotations

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from mmlens.zoo.tiny import llava as builder
from mmlens.zoo.tiny import tiny_hf_model

IMAGE_TOKEN = 99
VOCAB = 100


def tiny_llava_config(**kwargs) -> LlavaConfig:
    """``mmlens.zoo.tiny.llava.hf_config`` on a 100-word vocabulary with ``<image>`` = 99 (the
    ids ``tiny_inputs`` draws), no pad id."""
    return builder.hf_config(vocab=VOCAB, image_token=IMAGE_TOKEN, pad_token=None, **kwargs)


def tiny_llava(
    seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs
) -> LlavaForConditionalGeneration:
    return tiny_hf_model("llava", seed=seed, dtype=dtype, scale=0.02, vocab=VOCAB,
                         image_token=IMAGE_TOKEN, pad_token=None, **kwargs)


def n_image_tokens(config: LlavaConfig) -> int:
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n if config.vision_feature_select_strategy == "default" else n + 1


def tiny_inputs(config: LlavaConfig, batch: int = 1, prefix: int = 3, suffix: int = 6,
                seed: int = 1, pad: list[int] | None = None) -> dict[str, torch.Tensor]:
    """input_ids ``[bos, prefix, image tokens, suffix]`` per row, left padded by ``pad[i]``."""
    gen = torch.Generator().manual_seed(seed)
    n_img = n_image_tokens(config)
    pad = pad or [0] * batch
    width = 1 + prefix + n_img + suffix + max(pad)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row in range(batch):
        body = torch.cat([
            torch.tensor([1]),
            torch.randint(3, IMAGE_TOKEN, (prefix,), generator=gen),
            torch.full((n_img,), IMAGE_TOKEN),
            torch.randint(3, IMAGE_TOKEN, (suffix + max(pad) - pad[row],), generator=gen),
        ])
        ids[row, pad[row]:] = body
        mask[row, pad[row]:] = 1
    size = config.vision_config.image_size
    pixel_values = torch.randn(batch, 3, size, size, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values}


def hf_image_features(output) -> torch.Tensor:
    """The projected image features of an HF LLaVA forward, ``[n_image_tokens, d_model]``.

    Newer transformers return them as ``output.image_outputs.pooler_output`` (a tensor or one
    tensor per image); older ones as ``output.image_hidden_states``.
    """
    image_outputs = getattr(output, "image_outputs", None)
    features = (image_outputs.pooler_output if image_outputs is not None
                else output.image_hidden_states)
    if isinstance(features, list | tuple):
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    return features.reshape(-1, features.shape[-1])


def small_shapes_model(seed: int = 0):
    """A 4-layer random LLaVA with the bundled model's processor (56 px images, 4x4 tokens):
    the shapes data's questions and tokenizer in a model that runs in milliseconds."""
    from mmlens import HookedMultimodalTransformer
    from mmlens.zoo.build import build_config, build_processor

    processor = build_processor(56)
    config = build_config(len(processor.tokenizer), image_size=56, vision_layers=2,
                          text_layers=4, width=32)
    torch.manual_seed(seed)
    return HookedMultimodalTransformer.from_hf_model(
        LlavaForConditionalGeneration(config), processor=processor).eval()
