"""Tiny randomly initialised Hugging Face LLaVA models and inputs, built offline in seconds."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

IMAGE_TOKEN = 99
VOCAB = 100


def tiny_llava_config(
    *,
    n_kv_heads: int = 2,
    feature_layer: int | list[int] = -2,
    strategy: str = "default",
    image_size: int = 32,
    patch_size: int = 8,
    vision_layers: int = 3,
    text_layers: int = 3,
    rope_parameters: dict | None = None,
) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
        num_attention_heads=4, image_size=image_size, patch_size=patch_size, projection_dim=16,
    )
    text_kwargs = dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=n_kv_heads, vocab_size=VOCAB,
        max_position_embeddings=512,
    )
    if rope_parameters is not None:
        text_kwargs["rope_parameters"] = rope_parameters
    text = LlamaConfig(**text_kwargs)
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
        vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
    )


def tiny_llava(
    seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs
) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(**kwargs))
    # Random init leaves norms at 1 and biases at 0: perturb every weight so parity is a real test.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model.to(dtype).eval()


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
