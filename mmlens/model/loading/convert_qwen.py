"""Pure conversion functions: a Hugging Face Qwen2-VL / Qwen2.5-VL state dict -> mmlens's.

The HF module tree they read (transformers >= 5)::

    model.visual
        .patch_embed.proj                                  (Conv3d, no bias)
        .blocks.{i}.{norm1, norm2, attn.qkv, attn.proj,
                     mlp.{fc1, fc2}                        (Qwen2-VL)
                     mlp.{gate,up,down}_proj}              (Qwen2.5-VL)
        .merger.{ln_q, mlp.0, mlp.2}
    model.language_model                                   (as LLaVA's, see convert.py)
    lm_head

The fused ``qkv`` projection is split into our ``q``/``k``/``v`` weights (rows ``[q; k; v]``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mmlens.model.config import QwenVisionConfig
from mmlens.model.loading.convert import _prefix, take

_PLAIN_MLP = {"mlp.in_weight": "mlp.fc1.weight", "mlp.in_bias": "mlp.fc1.bias",
              "mlp.out_weight": "mlp.fc2.weight", "mlp.out_bias": "mlp.fc2.bias"}
_GATED_MLP = {"mlp.gate_weight": "mlp.gate_proj.weight", "mlp.gate_bias": "mlp.gate_proj.bias",
              "mlp.in_weight": "mlp.up_proj.weight", "mlp.in_bias": "mlp.up_proj.bias",
              "mlp.out_weight": "mlp.down_proj.weight", "mlp.out_bias": "mlp.down_proj.bias"}
_ATTENTION = {"attn.o_weight": "attn.proj.weight", "attn.o_bias": "attn.proj.bias"}
_MERGER = {"in_weight": "mlp.0.weight", "in_bias": "mlp.0.bias",
           "out_weight": "mlp.2.weight", "out_bias": "mlp.2.bias", "ln_q.w": "ln_q.weight"}


def _norms(vc: QwenVisionConfig) -> dict[str, str]:
    names = {"ln1.w": "norm1.weight", "ln2.w": "norm2.weight"}
    if not vc.rms_norm:
        names |= {"ln1.b": "norm1.bias", "ln2.b": "norm2.bias"}
    return names


def _split_qkv(weight: Tensor, out: dict[str, Tensor], prefix: str, kind: str) -> None:
    q, k, v = weight.chunk(3, dim=0)
    out[f"{prefix}attn.q_{kind}"], out[f"{prefix}attn.k_{kind}"] = q, k
    out[f"{prefix}attn.v_{kind}"] = v


def convert_vision_blocks(state: dict[str, Tensor], p: str, vc: QwenVisionConfig,
                          mlp: dict[str, str]) -> dict[str, Tensor]:
    """``vision.blocks.{l}.*`` from HF's ``{p}blocks.{l}.*`` (``mlp``: the MLP's names)."""
    out: dict[str, Tensor] = {}
    table = {**_norms(vc), **_ATTENTION, **mlp}
    for layer in range(vc.n_layers):
        ours, theirs = f"vision.blocks.{layer}.", f"{p}blocks.{layer}."
        for name, hf_name in table.items():
            out[ours + name] = take(state, theirs + hf_name)
        _split_qkv(take(state, theirs + "attn.qkv.weight"), out, ours, "weight")
        _split_qkv(take(state, theirs + "attn.qkv.bias"), out, ours, "bias")
    return out


def convert_qwen_vision(state: dict[str, Tensor], vc: QwenVisionConfig) -> dict[str, Tensor]:
    """Vision transformer and patch merger: ``vision.*`` and ``merger.*``."""
    p = _prefix(state, "model.visual.", "visual.")
    out = {"vision.W_patch": take(state, p + "patch_embed.proj.weight")}
    out |= convert_vision_blocks(state, p, vc, _GATED_MLP if vc.gated_mlp else _PLAIN_MLP)
    merger = dict(_MERGER)
    if not vc.rms_norm:
        merger["ln_q.b"] = "ln_q.bias"
    for name, hf_name in merger.items():
        out[f"merger.{name}"] = take(state, f"{p}merger.{hf_name}")
    return out


def _common(vc: Any) -> dict[str, Any]:
    rope = getattr(vc, "rope_parameters", None) or {}
    return dict(
        n_heads=vc.num_heads, n_layers=vc.depth, patch_size=vc.patch_size,
        temporal_patch_size=vc.temporal_patch_size, merge_size=vc.spatial_merge_size,
        n_channels=vc.in_channels, act_fn=vc.hidden_act, rope_theta=rope.get("rope_theta", 1e4),
    )


def qwen2_vision_config(vc: Any) -> QwenVisionConfig:
    """Read a ``Qwen2VLConfig``'s ``vision_config``: LayerNorm, plain MLP, full attention."""
    return QwenVisionConfig(d_model=vc.embed_dim, d_mlp=int(vc.embed_dim * vc.mlp_ratio),
                            d_out=vc.hidden_size, **_common(vc))


def qwen25_vision_config(vc: Any) -> QwenVisionConfig:
    """Read a ``Qwen2_5_VLConfig``'s ``vision_config``: RMSNorm, gated MLP, window attention
    outside ``fullatt_block_indexes``."""
    return QwenVisionConfig(
        d_model=vc.hidden_size, d_mlp=vc.intermediate_size, d_out=vc.out_hidden_size,
        gated_mlp=True, rms_norm=True, window_size=vc.window_size,
        full_attention_layers=tuple(vc.fullatt_block_indexes), **_common(vc))
