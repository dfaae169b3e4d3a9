"""Pure conversion functions: a Hugging Face Qwen3-VL config and state dict -> mmlens's.

The HF module tree they read (transformers >= 5)::

    model.visual
        .patch_embed.proj                              (Conv3d with bias)
        .pos_embed                                     (learned square table of positions)
        .blocks.{i}.{norm1, norm2, attn.qkv, attn.proj, mlp.linear_fc{1,2}}
        .merger.{norm, linear_fc1, linear_fc2}
        .deepstack_merger_list.{j}.{norm, linear_fc1, linear_fc2}
    model.language_model                               (Qwen3: as LLaVA's plus
        .layers.{i}.self_attn.{q,k}_norm                per-head q/k RMSNorm)
    lm_head
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mmlens.model.config import MultimodalConfig, QwenVisionConfig
from mmlens.model.loading.convert import _prefix, convert_language, take
from mmlens.model.loading.convert_qwen import convert_vision_blocks

_MLP = {"mlp.in_weight": "mlp.linear_fc1.weight", "mlp.in_bias": "mlp.linear_fc1.bias",
        "mlp.out_weight": "mlp.linear_fc2.weight", "mlp.out_bias": "mlp.linear_fc2.bias"}
_MERGER = {"in_weight": "linear_fc1.weight", "in_bias": "linear_fc1.bias",
           "out_weight": "linear_fc2.weight", "out_bias": "linear_fc2.bias",
           "ln_q.w": "norm.weight", "ln_q.b": "norm.bias"}


def qwen3_vision_config(hf_config: Any) -> QwenVisionConfig:
    """Read a ``Qwen3VLConfig``'s vision half; raises on DeepStack indexes it cannot run."""
    vc = hf_config.vision_config
    rope = getattr(vc, "rope_parameters", None) or {}
    layers = tuple(int(i) for i in vc.deepstack_visual_indexes)
    if len(set(layers)) != len(layers) or any(not 0 <= i < vc.depth for i in layers):
        raise ValueError(f"qwen3_vl: deepstack_visual_indexes {list(layers)} must be distinct "
                         f"vision blocks of the {vc.depth} in the tower")
    side = int(vc.num_position_embeddings ** 0.5)
    if side * side != vc.num_position_embeddings:
        raise ValueError(f"qwen3_vl: num_position_embeddings {vc.num_position_embeddings} is "
                         "not a square table of positions")
    return QwenVisionConfig(
        d_model=vc.hidden_size, n_heads=vc.num_heads, d_mlp=vc.intermediate_size,
        n_layers=vc.depth, d_out=vc.out_hidden_size, patch_size=vc.patch_size,
        temporal_patch_size=vc.temporal_patch_size, merge_size=vc.spatial_merge_size,
        n_channels=vc.in_channels, act_fn=vc.hidden_act, rope_theta=rope.get("rope_theta", 1e4),
        patch_bias=True, n_position_embeddings=vc.num_position_embeddings,
        deepstack_layers=layers)


def _merger(state: dict[str, Tensor], hf_prefix: str, ours: str) -> dict[str, Tensor]:
    return {f"{ours}.{name}": take(state, hf_prefix + hf_name) for name, hf_name in _MERGER.items()}


def convert_qwen3_vl(state: dict[str, Tensor], cfg: MultimodalConfig) -> dict[str, Tensor]:
    """Vision tower (``vision.*``), merger (``merger.*``), DeepStack mergers
    (``deepstack.{j}.*``) and the Qwen3 decoder."""
    vc = cfg.vision
    p = _prefix(state, "model.visual.", "visual.")
    out = {"vision.W_patch": take(state, p + "patch_embed.proj.weight"),
           "vision.b_patch": take(state, p + "patch_embed.proj.bias"),
           "vision.W_pos": take(state, p + "pos_embed.weight")}
    out |= convert_vision_blocks(state, p, vc, _MLP)
    out |= _merger(state, p + "merger.", "merger")
    for j in range(len(vc.deepstack_layers)):
        out |= _merger(state, f"{p}deepstack_merger_list.{j}.", f"deepstack.{j}")
    out |= convert_language(state, cfg)
    lp = _prefix(state, "model.language_model.", "language_model.model.", "model.")
    for layer in range(cfg.text.n_layers):
        for norm in ("q_norm", "k_norm"):
            out[f"blocks.{layer}.attn.{norm}.w"] = take(
                state, f"{lp}layers.{layer}.self_attn.{norm}.weight")
    return out
