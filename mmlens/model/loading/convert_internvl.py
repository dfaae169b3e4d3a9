"""Pure conversion functions: a Hugging Face InternVL config and state dict -> mmlens's.

The HF module tree they read (``InternVLForConditionalGeneration``, transformers >= 5)::

    model.vision_tower                                 (InternVLVisionModel)
        .embeddings.{cls_token, position_embeddings, patch_embeddings.projection}
        .encoder.layer.{i}.{layernorm_before, layernorm_after, lambda_1, lambda_2,
                            attention.{q,k,v}_proj, attention.projection_layer, mlp.fc{1,2}}
        .layernorm                                     (Identity with use_mean_pooling)
    model.multi_modal_projector.{layer_norm, linear_1, linear_2}
    model.language_model                               (Qwen2Model: q/k/v biases, GQA)
    lm_head                                            (tied to the embedding by default)
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mmlens.model.config import InternVisionConfig, MultimodalConfig, resolve_feature_layers
from mmlens.model.loading.convert import convert_language, take

_BLOCK = {
    "attn.q_weight": "attention.q_proj.weight", "attn.q_bias": "attention.q_proj.bias",
    "attn.k_weight": "attention.k_proj.weight", "attn.k_bias": "attention.k_proj.bias",
    "attn.v_weight": "attention.v_proj.weight", "attn.v_bias": "attention.v_proj.bias",
    "attn.o_weight": "attention.projection_layer.weight",
    "attn.o_bias": "attention.projection_layer.bias",
    "ln1.w": "layernorm_before.weight", "ln1.b": "layernorm_before.bias",
    "ln2.w": "layernorm_after.weight", "ln2.b": "layernorm_after.bias",
    "mlp.in_weight": "mlp.fc1.weight", "mlp.in_bias": "mlp.fc1.bias",
    "mlp.out_weight": "mlp.fc2.weight", "mlp.out_bias": "mlp.fc2.bias",
    "ls1": "lambda_1", "ls2": "lambda_2",
}
_PROJECTOR = {"ln.w": "layer_norm.weight", "ln.b": "layer_norm.bias",
              "in_weight": "linear_1.weight", "in_bias": "linear_1.bias",
              "out_weight": "linear_2.weight", "out_bias": "linear_2.bias"}


def internvl_vision_config(hf_config: Any) -> tuple[InternVisionConfig, int]:
    """The vision half of an ``InternVLConfig`` and the selected hidden state's index (0 =
    embeddings, i = block i-1); raises on settings HF's own model or mmlens cannot run."""
    vc = hf_config.vision_config
    name = "internvl"
    checks = [
        (vc.model_type == "internvl_vision",
         f"vision tower {vc.model_type!r} is not supported: mmlens supports internvl_vision"),
        (hf_config.text_config.model_type == "qwen2",
         f"text model {hf_config.text_config.model_type!r} is not supported: mmlens supports "
         "qwen2 (InternVL 3)"),
        (not vc.use_qk_norm, "use_qk_norm=True (InternViT-6B) is not supported: mmlens runs "
         "the InternViT-300M towers of InternVL 3 (1B to 14B)"),
        (vc.use_absolute_position_embeddings,
         "use_absolute_position_embeddings=False is not supported"),
        (vc.norm_type in ("layer_norm", "rms_norm"), f"norm_type {vc.norm_type!r} is unknown"),
        (hf_config.vision_feature_select_strategy == "default",
         f"vision_feature_select_strategy {hf_config.vision_feature_select_strategy!r} keeps "
         "the class token, which breaks the pixel shuffle's square grid (HF's model cannot run "
         "it either): use 'default'"),
        (isinstance(hf_config.vision_feature_layer, int),
         "a list of vision_feature_layer is not supported: InternVL selects one layer"),
        (hf_config.downsample_ratio == 0.5,
         f"downsample_ratio {hf_config.downsample_ratio} is not supported: InternVL shuffles "
         "2x2 patches into one token (0.5)"),
        (vc.image_size[0] == vc.image_size[1] and vc.patch_size[0] == vc.patch_size[1]
         and (vc.image_size[0] // vc.patch_size[0]) % 2 == 0,
         f"image_size {vc.image_size} / patch_size {vc.patch_size} must give a square grid "
         "of an even number of patches a side"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{name}: {message}")
    feature = resolve_feature_layers(hf_config.vision_feature_layer, vc.num_hidden_layers)[0]
    last = hf_config.vision_feature_layer == -1
    vision = InternVisionConfig(
        d_model=vc.hidden_size, n_heads=vc.num_attention_heads, d_mlp=vc.intermediate_size,
        n_layers=feature, image_size=vc.image_size[0], patch_size=vc.patch_size[0],
        n_channels=vc.num_channels, eps=vc.layer_norm_eps, act_fn=vc.hidden_act,
        rms_norm=vc.norm_type == "rms_norm", qkv_bias=vc.attention_bias,
        final_norm=last and not vc.use_mean_pooling,
        shuffle_scale=hf_config.downsample_ratio)
    if hf_config.image_seq_length != vision.tokens_per_tile:
        raise ValueError(f"{name}: image_seq_length {hf_config.image_seq_length} differs from "
                         f"the {vision.tokens_per_tile} tokens a tile makes: is the config "
                         "edited?")
    return vision, feature


def convert_internvl(state: dict[str, Tensor], cfg: MultimodalConfig) -> dict[str, Tensor]:
    """Vision tower (``vision.*``), connector (``projector.*``) and the Qwen2 decoder."""
    p = "model.vision_tower."
    out = {
        "vision.embed.W_patch": take(state, p + "embeddings.patch_embeddings.projection.weight"),
        "vision.embed.b_patch": take(state, p + "embeddings.patch_embeddings.projection.bias"),
        "vision.embed.class_embed": take(state, p + "embeddings.cls_token").reshape(-1),
        "vision.embed.W_pos": take(state, p + "embeddings.position_embeddings")[0],
    }
    for layer in range(cfg.vision.n_layers):
        for ours, theirs in _BLOCK.items():
            optional = ours.endswith(("_bias", ".b")) and ours != "attn.o_bias"
            weight = take(state, f"{p}encoder.layer.{layer}.{theirs}", optional=optional)
            if weight is not None:
                out[f"vision.blocks.{layer}.{ours}"] = weight
    if cfg.vision.final_norm:
        out["vision.ln_post.w"] = take(state, p + "layernorm.weight")
        out["vision.ln_post.b"] = take(state, p + "layernorm.bias")
    for ours, theirs in _PROJECTOR.items():
        out[f"projector.{ours}"] = take(state, "model.multi_modal_projector." + theirs)
    return {**out, **convert_language(state, cfg)}
