"""Gated cross-attention decoder layers (Llama-3.2-Vision): text queries, image keys.

The image never enters the token sequence: in the layers of ``cross_attention_layers`` the
text attends to the projected vision features instead of to itself::

    resid_pre ─▶ ln1 ─▶ cross_attn.hook_q ... hook_pattern ─▶ hook_z ─▶ × hook_attn_gate
        ─▶ hook_attn_out ─▶ resid_mid ─▶ ln2 ─▶ mlp (× HF's row rule) ─▶ × hook_mlp_gate
        ─▶ hook_mlp_out ─▶ resid_post

``cross_attn.hook_mask`` ``[batch, 1, text, image keys]`` (True = may attend) is HF's mask with
its rows that see no image opened to every key (HF's uniform average; the MLP output of those
rows is zeroed, its rule, ``CrossAttentionInputs.rows``). A row whose every key is blocked in
the mask a hook returns (a knockout) gets exactly zero attention output; the rest of the layer
runs unchanged. Without images the layer passes its input through, as HF skips it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn
from torch.nn import functional as F
from transformer_lens.hook_points import HookPoint

from mmlens.model.components.attention import Attention
from mmlens.model.components.mlp import GatedMLP
from mmlens.model.components.norms import RMSNorm
from mmlens.model.config import LanguageConfig


@dataclass
class CrossAttentionInputs:
    """What the cross-attention layers read: the image keys' features, HF's mask and its row
    rule (``rows``: the text rows that see some image), over the text positions of the run."""

    states: Float[Tensor, "batch keys d_model"]
    mask: Bool[Tensor, "batch 1 text keys"]
    rows: Bool[Tensor, "batch text"]

    def last(self, q_len: int) -> CrossAttentionInputs:
        """The inputs of the last ``q_len`` text positions (a run with a key/value cache)."""
        return CrossAttentionInputs(self.states, self.mask[:, :, -q_len:], self.rows[:, -q_len:])

    def after(self, past: int, q_len: int) -> CrossAttentionInputs:
        """The inputs of the ``q_len`` positions after the first ``past`` (a run resumed on a
        key/value cache): these rows where they are held (the cached prompt's own positions,
        the knockout engine's suffixes), else each sees what the last held row sees (HF's
        generate repeats the last row of the cross-attention mask)."""
        if past + q_len <= self.mask.shape[2]:
            return CrossAttentionInputs(self.states, self.mask[:, :, past:past + q_len],
                                        self.rows[:, past:past + q_len])
        return CrossAttentionInputs(self.states, self.mask[:, :, -1:].expand(-1, -1, q_len, -1),
                                    self.rows[:, -1:].expand(-1, q_len))

    def expand(self, batch: int) -> CrossAttentionInputs:
        """A batch-1 input repeated ``batch`` times (no copy)."""
        return CrossAttentionInputs(self.states.expand(batch, -1, -1),
                                    self.mask.expand(batch, -1, -1, -1),
                                    self.rows.expand(batch, -1))


class CrossAttention(Attention):
    """Grouped-query attention from text to image keys, with per-head q/k RMSNorm and no
    rotary; hooks as ``Attention``'s (``hook_k``/``hook_v`` over the image keys)."""

    def forward(  # type: ignore[override]
        self, x: Float[Tensor, "batch pos d_model"], states: Float[Tensor, "batch keys d_model"],
        mask: Bool[Tensor, "batch 1 pos keys"],
    ) -> Float[Tensor, "batch pos d_model"]:
        batch, q_len, _ = x.shape
        q = self.hook_q(F.linear(x, self.q_weight).view(batch, q_len, -1, self.d_head))
        k = self.hook_k(F.linear(states, self.k_weight).view(batch, -1, self.n_kv_heads,
                                                            self.d_head))
        v = self.hook_v(F.linear(states, self.v_weight).view(batch, -1, self.n_kv_heads,
                                                            self.d_head))
        q, k = self.hook_q_normed(self.q_norm(q)), self.hook_k_normed(self.k_norm(k))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        mask = self.hook_mask(mask.clone())
        blocked = ~mask.any(-1, keepdim=True)  # [batch, 1, pos, 1]: every key knocked out
        open_mask = mask | blocked  # keeps the softmax finite; those rows are zeroed below
        if self._needs_explicit_pattern():
            repeats = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.d_head**-0.5
            scores = self.hook_attn_scores(
                scores.masked_fill(~open_mask, torch.finfo(scores.dtype).min))
            pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            z = torch.matmul(self.hook_pattern(pattern.masked_fill(blocked, 0)), v)
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=open_mask,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
            z = z.masked_fill(blocked, 0)
        z = self.hook_z(z.transpose(1, 2))
        if self.use_attn_result:
            result = self.hook_result(torch.einsum("bqhe,hed->bqhd", z, self.W_O))
            return result.sum(-2)
        return F.linear(z.reshape(batch, q_len, -1), self.o_weight)


class CrossAttentionBlock(nn.Module):
    """An Mllama cross-attention decoder layer; its attention module is ``cross_attn``."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        # Registered in data-flow order, which is the order of the model's hook names.
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.ln1 = RMSNorm(cfg.d_model, cfg.eps)
        self.cross_attn = CrossAttention(
            cfg.d_model, cfg.n_heads, cfg.d_head, cfg.n_key_value_heads,
            qk_norm=(RMSNorm(cfg.d_head, cfg.eps), RMSNorm(cfg.d_head, cfg.eps)))
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.hook_attn_gate = HookPoint()  # [1], tanh of the gate
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.ln2 = RMSNorm(cfg.d_model, cfg.eps)
        self.mlp = GatedMLP(cfg.d_model, cfg.d_mlp, cfg.act_fn, bias=cfg.mlp_bias)
        self.mlp_gate = nn.Parameter(torch.zeros(1))
        self.hook_mlp_gate = HookPoint()  # [1], tanh of the gate
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(
        self, resid_pre: Float[Tensor, "batch pos d_model"], *,
        cross: CrossAttentionInputs | None = None, past_key_value: object = None, **_: object,
    ) -> tuple[Float[Tensor, "batch pos d_model"], None]:
        """``cross`` None (no image): the input passes through, as HF skips the layer."""
        resid_pre = self.hook_resid_pre(resid_pre)
        if cross is None:
            return self.hook_resid_post(resid_pre), None
        cross = cross.last(resid_pre.shape[1])
        attn_out = self.cross_attn(self.ln1(resid_pre), cross.states.to(resid_pre.dtype),
                                   cross.mask)
        attn_out = self.hook_attn_gate(self.attn_gate.tanh()) * attn_out
        resid_mid = self.hook_resid_mid(resid_pre + self.hook_attn_out(attn_out))
        mlp_out = self.mlp(self.ln2(resid_mid)) * cross.rows[..., None].to(resid_mid.dtype)
        mlp_out = self.hook_mlp_gate(self.mlp_gate.tanh()) * mlp_out
        return self.hook_resid_post(resid_mid + self.hook_mlp_out(mlp_out)), None
