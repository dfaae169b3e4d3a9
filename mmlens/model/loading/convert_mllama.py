"""Pure conversion: a Hugging Face Llama-3.2-Vision (Mllama) state dict -> mmlens's.

The HF module tree it reads (transformers >= 5)::

    model.vision_model
        .patch_embedding, .class_embedding, .layernorm_{pre,post}
        .{pre,post}_tile_positional_embedding.{embedding, gate}
        .gated_positional_embedding.{embedding, tile_embedding, gate}
        .transformer.layers.{i}, .global_transformer.layers.{i} (+ gate_attn, gate_ffn)
    model.multi_modal_projector                        (one linear layer)
    model.language_model.layers.{l}                    (Llama self-attention layers, and in
        .cross_attn.{q,k,v,o}_proj, .cross_attn.{q,k}_norm   cross_attention_layers these,
        .cross_attn_{attn,mlp}_gate                          with the Llama MLP and norms)
    lm_head
"""

from __future__ import annotations

from torch import Tensor

from mmlens.model.config import MultimodalConfig
from mmlens.model.loading.convert import convert_language, find_prefix, take

_VISION_BLOCK = {
    "attn.q_weight": "self_attn.q_proj.weight", "attn.k_weight": "self_attn.k_proj.weight",
    "attn.v_weight": "self_attn.v_proj.weight", "attn.o_weight": "self_attn.o_proj.weight",
    "ln1.w": "input_layernorm.weight", "ln1.b": "input_layernorm.bias",
    "ln2.w": "post_attention_layernorm.weight", "ln2.b": "post_attention_layernorm.bias",
    "mlp.in_weight": "mlp.fc1.weight", "mlp.in_bias": "mlp.fc1.bias",
    "mlp.out_weight": "mlp.fc2.weight", "mlp.out_bias": "mlp.fc2.bias",
}
_CROSS_BLOCK = {
    "cross_attn.q_weight": "cross_attn.q_proj.weight",
    "cross_attn.k_weight": "cross_attn.k_proj.weight",
    "cross_attn.v_weight": "cross_attn.v_proj.weight",
    "cross_attn.o_weight": "cross_attn.o_proj.weight",
    "cross_attn.q_norm.w": "cross_attn.q_norm.weight",
    "cross_attn.k_norm.w": "cross_attn.k_norm.weight",
    "attn_gate": "cross_attn_attn_gate", "mlp_gate": "cross_attn_mlp_gate",
    "ln1.w": "input_layernorm.weight", "ln2.w": "post_attention_layernorm.weight",
    "mlp.gate_weight": "mlp.gate_proj.weight", "mlp.in_weight": "mlp.up_proj.weight",
    "mlp.out_weight": "mlp.down_proj.weight",
}


def convert_mllama(state: dict[str, Tensor], cfg: MultimodalConfig) -> dict[str, Tensor]:
    """Vision encoder (``vision.*``), projector (``projector.*``) and the decoder, whose
    cross-attention layers are renamed here (``convert_language`` skips their absent
    self-attention)."""
    p = find_prefix(state, "model.vision_model.", "vision_model.")
    out = {"vision.W_patch": take(state, p + "patch_embedding.weight"),
           "vision.class_embed": take(state, p + "class_embedding"),
           "vision.pos.gate": take(state, p + "gated_positional_embedding.gate"),
           "vision.pos.W_pos": take(state, p + "gated_positional_embedding.embedding"),
           "vision.pos.W_tile": take(state, p + "gated_positional_embedding.tile_embedding.weight")}
    for ours, theirs in (("pre_tile", "pre_tile_positional_embedding"),
                         ("post_tile", "post_tile_positional_embedding")):
        out[f"vision.{ours}.W"] = take(state, f"{p}{theirs}.embedding.weight")
        out[f"vision.{ours}.gate"] = take(state, f"{p}{theirs}.gate")
    for ours, theirs in (("ln_pre", "layernorm_pre"), ("ln_post", "layernorm_post")):
        out[f"vision.{ours}.w"] = take(state, f"{p}{theirs}.weight")
        out[f"vision.{ours}.b"] = take(state, f"{p}{theirs}.bias")
    for ours, theirs, n_layers in (("blocks", "transformer", cfg.vision.n_layers),
                                   ("global_blocks", "global_transformer",
                                    cfg.vision.n_global_layers)):
        for layer in range(n_layers):
            names = {**_VISION_BLOCK, **({"attn_gate": "gate_attn", "mlp_gate": "gate_ffn"}
                                         if ours == "global_blocks" else {})}
            for name, hf_name in names.items():
                out[f"vision.{ours}.{layer}.{name}"] = take(
                    state, f"{p}{theirs}.layers.{layer}.{hf_name}")
    pp = find_prefix(state, "model.multi_modal_projector.", "multi_modal_projector.")
    out["projector.weight"] = take(state, pp + "weight")
    out["projector.bias"] = take(state, pp + "bias")
    lp = find_prefix(state, "model.language_model.", "language_model.model.")
    cross = set(cfg.text.cross_attention_layers)
    out |= convert_language(state, cfg, skip=cross)
    for layer in sorted(cross):
        for name, hf_name in _CROSS_BLOCK.items():
            out[f"blocks.{layer}.{name}"] = take(state, f"{lp}layers.{layer}.{hf_name}")
    return out
