"""Pre-norm transformer blocks: ``resid_pre -> attn -> resid_mid -> mlp -> resid_post``."""

from __future__ import annotations

from jaxtyping import Bool, Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from mmlens.model.components.attention import Attention, KeyValue
from mmlens.model.components.mlp import GatedMLP, VisionMLP
from mmlens.model.components.norms import LayerNorm, RMSNorm
from mmlens.model.config import LanguageConfig, ShuffleVisionConfig, VisionConfig


class _Block(nn.Module):
    ln1: nn.Module
    ln2: nn.Module
    attn: Attention
    mlp: nn.Module

    def _register(self, ln1: nn.Module, attn: Attention, ln2: nn.Module, mlp: nn.Module) -> None:
        # Registered in data-flow order, which is the order of the model's hook names.
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.ln1 = ln1
        self.attn = attn
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.ln2 = ln2
        self.mlp = mlp
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(
        self,
        resid_pre: Float[Tensor, "batch pos d_model"],
        *,
        mask: Bool[Tensor, "batch 1 q_pos k_pos"] | None = None,
        causal: bool = False,
        rotary: tuple[Tensor, Tensor] | None = None,
        past_key_value: KeyValue | None = None,
        inject: Float[Tensor, "batch pos d_model"] | None = None,
    ) -> tuple[Float[Tensor, "batch pos d_model"], KeyValue]:
        """``inject``: features added to the block's output (DeepStack blocks only)."""
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out, present = self.attn(
            self.ln1(resid_pre),
            mask=mask, causal=causal, rotary=rotary, past_key_value=past_key_value,
        )
        resid_mid = self.hook_resid_mid(resid_pre + self.hook_attn_out(attn_out))
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_mid)))
        return self.hook_resid_post(self._add_injection(resid_mid + mlp_out, inject)), present

    def _add_injection(self, resid: Tensor, inject: Tensor | None) -> Tensor:
        if inject is not None:
            raise ValueError(f"{type(self).__name__} takes no injected features")
        return resid


class LanguageBlock(_Block):
    """A Llama / Qwen2 / Qwen3 decoder layer: RMSNorm, rotary grouped-query attention (q/k/v
    biases for Qwen2, per-head q/k RMSNorm for Qwen3), gated SiLU MLP."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self._register(
            RMSNorm(cfg.d_model, cfg.eps),
            Attention(cfg.d_model, cfg.n_heads, cfg.d_head, cfg.n_key_value_heads,
                      qkv_bias=cfg.qkv_bias, out_bias=cfg.o_bias, rotary=True,
                      qk_norm=(RMSNorm(cfg.d_head, cfg.eps), RMSNorm(cfg.d_head, cfg.eps))
                      if cfg.qk_norm else None),
            RMSNorm(cfg.d_model, cfg.eps),
            GatedMLP(cfg.d_model, cfg.d_mlp, cfg.act_fn, bias=cfg.mlp_bias),
        )


class VisionBlock(_Block):
    """A CLIP or SigLIP encoder layer: LayerNorm, full (non-causal) attention with biases, an
    MLP with the tower's activation (quick-GELU for CLIP, tanh-approximated GELU for SigLIP and
    Idefics3's tower)."""

    def __init__(self, cfg: VisionConfig | ShuffleVisionConfig):
        super().__init__()
        self._register(
            LayerNorm(cfg.d_model, cfg.eps),
            Attention(cfg.d_model, cfg.n_heads, cfg.d_head, qkv_bias=True, out_bias=True),
            LayerNorm(cfg.d_model, cfg.eps),
            VisionMLP(cfg.d_model, cfg.d_mlp, cfg.act_fn),
        )
