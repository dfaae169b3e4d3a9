"""Pure conversion functions: a Hugging Face LLaVA state dict -> mmlens's state dict.

The HF module tree they read (transformers >= 5)::

    model.vision_tower[.vision_model]
        .embeddings.{class_embedding, patch_embedding, position_embedding}
        .pre_layrnorm
        .encoder.layers.{i}.{self_attn.{q,k,v,out}_proj, layer_norm{1,2}, mlp.fc{1,2}}
    model.multi_modal_projector.linear_{1,2}
    model.image_newline                                   (LLaVA-NeXT only)
    model.language_model
        .embed_tokens
        .layers.{i}.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj,
                     input_layernorm, post_attention_layernorm}
        .norm
    lm_head

Our weights keep HF's ``[out, in]`` layout (the TransformerLens-shaped ``W_Q``... are views),
so conversion is a renaming; only this module and the family adapters
(``mmlens.model.families``) know HF's names. The tables and converters here are building
blocks the families compose.
"""

from __future__ import annotations

from torch import Tensor

from mmlens.model.config import MultimodalConfig

_VISION_BLOCK = {
    "attn.q_weight": "self_attn.q_proj.weight", "attn.q_bias": "self_attn.q_proj.bias",
    "attn.k_weight": "self_attn.k_proj.weight", "attn.k_bias": "self_attn.k_proj.bias",
    "attn.v_weight": "self_attn.v_proj.weight", "attn.v_bias": "self_attn.v_proj.bias",
    "attn.o_weight": "self_attn.out_proj.weight", "attn.o_bias": "self_attn.out_proj.bias",
    "ln1.w": "layer_norm1.weight", "ln1.b": "layer_norm1.bias",
    "ln2.w": "layer_norm2.weight", "ln2.b": "layer_norm2.bias",
    "mlp.in_weight": "mlp.fc1.weight", "mlp.in_bias": "mlp.fc1.bias",
    "mlp.out_weight": "mlp.fc2.weight", "mlp.out_bias": "mlp.fc2.bias",
}
_LANGUAGE_BLOCK = {
    "attn.q_weight": "self_attn.q_proj.weight", "attn.q_bias": "self_attn.q_proj.bias",
    "attn.k_weight": "self_attn.k_proj.weight", "attn.k_bias": "self_attn.k_proj.bias",
    "attn.v_weight": "self_attn.v_proj.weight", "attn.v_bias": "self_attn.v_proj.bias",
    "attn.o_weight": "self_attn.o_proj.weight", "attn.o_bias": "self_attn.o_proj.bias",
    "mlp.gate_weight": "mlp.gate_proj.weight", "mlp.gate_bias": "mlp.gate_proj.bias",
    "mlp.in_weight": "mlp.up_proj.weight", "mlp.in_bias": "mlp.up_proj.bias",
    "mlp.out_weight": "mlp.down_proj.weight", "mlp.out_bias": "mlp.down_proj.bias",
    "ln1.w": "input_layernorm.weight", "ln2.w": "post_attention_layernorm.weight",
}


def _prefix(state: dict[str, Tensor], *candidates: str) -> str:
    for candidate in candidates:
        if any(key.startswith(candidate) for key in state):
            return candidate
    raise KeyError(f"none of the expected weight prefixes {candidates} is in the checkpoint: "
                   "is it a LLaVA checkpoint in Hugging Face format?")


def _take(state: dict[str, Tensor], key: str, optional: bool = False) -> Tensor | None:
    if key in state:
        return state[key]
    if optional:
        return None
    raise KeyError(f"weight {key!r} is missing from the checkpoint")


def convert_vision(state: dict[str, Tensor], cfg: MultimodalConfig) -> dict[str, Tensor]:
    """CLIP vision tower; the blocks after the last selected feature layer are dropped."""
    p = _prefix(state, "model.vision_tower.vision_model.", "model.vision_tower.",
                "vision_tower.vision_model.")
    out = {
        "vision.embed.class_embed": _take(state, p + "embeddings.class_embedding"),
        "vision.embed.W_patch": _take(state, p + "embeddings.patch_embedding.weight"),
        "vision.embed.W_pos": _take(state, p + "embeddings.position_embedding.weight"),
        "vision.ln_pre.w": _take(state, p + "pre_layrnorm.weight"),
        "vision.ln_pre.b": _take(state, p + "pre_layrnorm.bias"),
    }
    for layer in range(cfg.vision.n_layers):
        for ours, theirs in _VISION_BLOCK.items():
            out[f"vision.blocks.{layer}.{ours}"] = _take(
                state, f"{p}encoder.layers.{layer}.{theirs}")
    return out


def convert_projector(state: dict[str, Tensor], cfg: MultimodalConfig) -> dict[str, Tensor]:
    """The two-layer projector."""
    p = _prefix(state, "model.multi_modal_projector.", "multi_modal_projector.")
    out = {
        "projector.in_weight": _take(state, p + "linear_1.weight"),
        "projector.out_weight": _take(state, p + "linear_2.weight"),
    }
    if cfg.projector_bias:
        out["projector.in_bias"] = _take(state, p + "linear_1.bias")
        out["projector.out_bias"] = _take(state, p + "linear_2.bias")
    return out


def convert_language(state: dict[str, Tensor], cfg: MultimodalConfig,
                     skip: set[int] | frozenset[int] = frozenset()) -> dict[str, Tensor]:
    """The Llama / Qwen2 decoder, final norm and unembedding (tied to the embedding when absent);
    the layers of ``skip`` are left to the caller (Mllama's cross-attention layers)."""
    p = _prefix(state, "model.language_model.", "language_model.model.", "model.")
    tc = cfg.text
    out = {"embed.W_E": _take(state, p + "embed_tokens.weight"),
           "ln_final.w": _take(state, p + "norm.weight")}
    for layer in (layer for layer in range(tc.n_layers) if layer not in skip):
        for ours, theirs in _LANGUAGE_BLOCK.items():
            optional = ours.endswith("_bias")
            weight = _take(state, f"{p}layers.{layer}.{theirs}", optional=optional)
            if weight is not None:
                out[f"blocks.{layer}.{ours}"] = weight
    head = _take(state, "lm_head.weight", optional=True)
    if head is None:
        head = _take(state, "language_model.lm_head.weight", optional=True)
    out["unembed.weight"] = head if head is not None else out["embed.W_E"]
    return out


def convert_llava_state_dict(state: dict[str, Tensor], cfg: MultimodalConfig) -> dict[str, Tensor]:
    """Vision tower, projector and decoder of a LLaVA checkpoint (LLaVA-NeXT's family adds its
    ``image_newline``)."""
    return {**convert_vision(state, cfg), **convert_projector(state, cfg),
            **convert_language(state, cfg)}


# Public names for the family adapters that compose these converters.
take = _take
find_prefix = _prefix
VISION_BLOCK = _VISION_BLOCK
