"""The Gemma decoders (Gemma, Gemma 2, Gemma 3) read, built and masked, for the multimodal
families that carry them (Gemma 3, PaliGemma, PaliGemma 2).

    text config ──gemma_text_config──▶ GemmaLanguageConfig (layer types, window, scale, caps)
    ──gemma_blocks──▶ GemmaBlock per layer; LayerTypeRotary: one rotary table per layer type
    gemma_masks: causal (OR a bidirectional pattern), AND padding, AND the window on sliding
    layers; convert_gemma_language: HF's decoder weights -> ours
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from mmlens.core.errors import MMLensError
from mmlens.model.components import Attention, GatedMLP, RotaryEmbedding
from mmlens.model.components.gemma import GemmaBlock, GemmaRMSNorm
from mmlens.model.config import LanguageConfig, MultimodalConfig
from mmlens.model.loading.convert import find_prefix, take

SLIDING, FULL = "sliding_attention", "full_attention"
_GEMMA_BLOCK = {
    "attn.q_weight": "self_attn.q_proj.weight", "attn.k_weight": "self_attn.k_proj.weight",
    "attn.v_weight": "self_attn.v_proj.weight", "attn.o_weight": "self_attn.o_proj.weight",
    "attn.q_bias": "self_attn.q_proj.bias", "attn.k_bias": "self_attn.k_proj.bias",
    "attn.v_bias": "self_attn.v_proj.bias", "attn.o_bias": "self_attn.o_proj.bias",
    "attn.q_norm.w": "self_attn.q_norm.weight", "attn.k_norm.w": "self_attn.k_norm.weight",
    "mlp.gate_weight": "mlp.gate_proj.weight", "mlp.in_weight": "mlp.up_proj.weight",
    "mlp.out_weight": "mlp.down_proj.weight",
    "ln1.w": "input_layernorm.weight", "ln1_post.w": "post_attention_layernorm.weight",
    "ln2.w": "pre_feedforward_layernorm.weight", "ln2_post.w": "post_feedforward_layernorm.weight",
}


@dataclasses.dataclass
class GemmaLanguageConfig(LanguageConfig):
    """A Gemma decoder: ``post_norms`` (Gemma 2 and 3 norm the attention and MLP outputs),
    ``layer_types`` per layer (``"sliding_attention"`` or ``"full_attention"``), the window,
    the score scale and soft-caps, and the inverse frequencies of each layer type (Gemma 3's
    local base for the sliding layers)."""

    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    query_pre_attn_scalar: float = 1.0
    attn_softcap: float | None = None
    final_softcap: float | None = None
    qk_norm: bool = False
    post_norms: bool = True
    rope_by_type: dict[str, tuple[Tensor, float]] = dataclasses.field(default_factory=dict)


def _rope_for(tc: Any, layer_type: str | None) -> tuple[Tensor, float]:
    """Inverse frequencies and attention scaling of one layer type (Gemma 3) or of every layer
    (Gemma, Gemma 2: ``layer_type`` None), as HF computes them."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = tc.rope_parameters if layer_type is None else tc.rope_parameters[layer_type]
    if params["rope_type"] == "default":
        dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        base = params["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    if params["rope_type"] not in ROPE_INIT_FUNCTIONS:
        raise MMLensError(f"rope type {params['rope_type']!r} is not supported: use one of "
                          f"default, {', '.join(ROPE_INIT_FUNCTIONS)}")
    extra = {} if layer_type is None else {"layer_type": layer_type}
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](tc, torch.device("cpu"), **extra)
    return inv_freq.float(), float(scaling)


GEMMA_TEXT = ("gemma", "gemma2", "gemma3_text")


def gemma_text_config(tc: Any) -> GemmaLanguageConfig:
    """A Gemma, Gemma 2 or Gemma 3 text config read; refuses settings mmlens cannot run.

    Gemma: no post-norms, scores scaled by ``head_dim ** -0.5``. Gemma 2: post-norms,
    ``query_pre_attn_scalar``, attention and final soft-caps, alternating sliding layers.
    Gemma 3: as Gemma 2 with q/k norms and a rotary base per layer type; its multimodal model
    applies no soft-cap (HF passes none), so none is read. (PaliGemma sets
    ``use_bidirectional_attention`` on its decoder; its masks are the family's prefix rule.)
    """
    kind = tc.model_type
    if kind not in GEMMA_TEXT:
        raise MMLensError(f"text model {kind!r} is not a Gemma decoder: mmlens supports "
                          f"{', '.join(GEMMA_TEXT)}")
    if kind == "gemma3_text" and getattr(tc, "use_bidirectional_attention", False):
        raise MMLensError("use_bidirectional_attention=True (embedding models) is not "
                          "supported: mmlens runs Gemma's causal decoder")
    types = tuple(getattr(tc, "layer_types", None) or [FULL] * tc.num_hidden_layers)
    if set(types) - {SLIDING, FULL}:
        raise MMLensError(f"layer types {sorted(set(types) - {SLIDING, FULL})} are not supported: "
                          f"Gemma layers are {SLIDING} or {FULL}")
    if kind == "gemma3_text":
        rope = {t: _rope_for(tc, t) for t in sorted(set(types))}
    else:
        rope = dict.fromkeys(sorted(set(types)), _rope_for(tc, None))
    bias = bool(getattr(tc, "attention_bias", False))
    d_head = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return GemmaLanguageConfig(
        n_layers=tc.num_hidden_layers, d_model=tc.hidden_size, n_heads=tc.num_attention_heads,
        n_key_value_heads=tc.num_key_value_heads, d_head=d_head,
        d_mlp=tc.intermediate_size, d_vocab=tc.vocab_size, eps=tc.rms_norm_eps,
        rope_inv_freq=rope[types[0]][0], rope_attention_scaling=rope[types[0]][1],
        qkv_bias=bias, o_bias=bias,
        act_fn=tc.hidden_act if kind == "gemma" else tc.hidden_activation,
        original_architecture={"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                               "gemma3_text": "Gemma3ForCausalLM"}[kind],
        layer_types=types, sliding_window=getattr(tc, "sliding_window", None),
        query_pre_attn_scalar=d_head if kind == "gemma" else tc.query_pre_attn_scalar,
        attn_softcap=tc.attn_logit_softcapping if kind == "gemma2" else None,
        final_softcap=tc.final_logit_softcapping if kind == "gemma2" else None,
        qk_norm=kind == "gemma3_text", post_norms=kind != "gemma", rope_by_type=rope)


class LayerTypeRotary:
    """``(position_ids, dtype) -> {layer_type: (cos, sin)}``; each block takes its own."""

    def __init__(self, rope_by_type: dict[str, tuple[Tensor, float]]):
        self.by_type = {t: RotaryEmbedding(f, s) for t, (f, s) in rope_by_type.items()}

    def __call__(self, position_ids: Tensor,
                 dtype: torch.dtype) -> dict[str, tuple[Tensor, Tensor]]:
        return {t: rotary(position_ids, dtype) for t, rotary in self.by_type.items()}


def gemma_blocks(cfg: GemmaLanguageConfig) -> nn.ModuleList:
    """One ``GemmaBlock`` per layer, each with its layer type."""

    def attention() -> Attention:
        norms = (GemmaRMSNorm(cfg.d_head, cfg.eps), GemmaRMSNorm(cfg.d_head, cfg.eps))
        return Attention(cfg.d_model, cfg.n_heads, cfg.d_head, cfg.n_key_value_heads,
                         qkv_bias=cfg.qkv_bias, out_bias=cfg.o_bias, rotary=True,
                         scale=cfg.query_pre_attn_scalar**-0.5, softcap=cfg.attn_softcap,
                         qk_norm=norms if cfg.qk_norm else None)

    return nn.ModuleList([
        GemmaBlock(attention(), GatedMLP(cfg.d_model, cfg.d_mlp, cfg.act_fn), cfg.d_model,
                   cfg.eps, layer_type, post_norms=cfg.post_norms)
        for layer_type in cfg.layer_types])


def image_blocks(is_image: Tensor) -> Tensor:
    """Runs of consecutive image tokens numbered 0, 1, ... per row; -1 elsewhere (HF's
    ``get_block_sequence_ids_for_mask``)."""
    previous = torch.nn.functional.pad(is_image, (1, 0), value=False)[:, :-1]
    ids = torch.cumsum((is_image & ~previous).int(), dim=1) - 1
    return torch.where(is_image, ids, -1)


def gemma_masks(cfg: GemmaLanguageConfig, attention_mask: Tensor, q_len: int,
                bidirectional: Tensor | None, window_cuts_bidirectional: bool = True,
                ) -> list[Tensor]:
    """Per layer: causal, OR'd with ``bidirectional`` ``[batch, q, k]`` where given, AND the
    padding, AND (sliding layers) the window ``k > q - sliding_window`` in sequence indices.
    ``window_cuts_bidirectional=False`` (PaliGemma's prefix) ORs the bidirectional pattern in
    after the window instead. Padding queries may attend everywhere (their outputs are never
    read)."""
    k_len = attention_mask.shape[1]
    device = attention_mask.device
    q_idx = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_idx = torch.arange(k_len, device=device)[None, :]
    causal = (k_idx <= q_idx)[None]
    allowed = causal if bidirectional is None else causal | bidirectional
    key_ok = attention_mask.bool()[:, None, :]
    query_pad = ~attention_mask.bool()[:, -q_len:, None]
    masks = {FULL: ((allowed & key_ok) | query_pad)[:, None]}
    if SLIDING in cfg.layer_types:
        window = (k_idx > q_idx - cfg.sliding_window)[None]
        if window_cuts_bidirectional or bidirectional is None:
            sliding = allowed & window
        else:
            sliding = (causal & window) | bidirectional
        masks[SLIDING] = ((sliding & key_ok) | query_pad)[:, None]
    return [masks[t] for t in cfg.layer_types]


def convert_gemma_language(state: dict[str, Tensor], cfg: MultimodalConfig) -> dict[str, Tensor]:
    """The Gemma decoder, final norm and unembedding (tied to the embedding when absent)."""
    p = find_prefix(state, "model.language_model.", "language_model.model.")
    out = {"embed.W_E": take(state, p + "embed_tokens.weight"),
           "ln_final.w": take(state, p + "norm.weight")}
    table = dict(_GEMMA_BLOCK)
    if not getattr(cfg.text, "post_norms", True):  # Gemma: the second norm is before the MLP
        del table["ln1_post.w"], table["ln2_post.w"]
        table["ln2.w"] = "post_attention_layernorm.weight"
    for layer in range(cfg.text.n_layers):
        for ours, theirs in table.items():
            optional = ours.endswith("_bias") or ".q_norm" in ours or ".k_norm" in ours
            weight = take(state, f"{p}layers.{layer}.{theirs}", optional=optional)
            if weight is not None:
                out[f"blocks.{layer}.{ours}"] = weight
    head = take(state, "lm_head.weight", optional=True)
    out["unembed.weight"] = head if head is not None else out["embed.W_E"]
    return out
