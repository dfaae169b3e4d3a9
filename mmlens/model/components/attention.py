"""Multi-head / grouped-query attention with every intermediate hookable and editable.

Two paths give the same numbers: ``scaled_dot_product_attention`` when no hook needs the
explicit scores or pattern, and an explicit path when one does. Knockouts edit
``hook_mask`` (a boolean "may attend" mask), which both paths honour, so they keep the fast path.
Blocked edges get their pre-softmax score SET to the dtype minimum, never added to.
"""

from __future__ import annotations

import torch
from einops import rearrange
from jaxtyping import Bool, Float
from torch import Tensor, nn
from torch.nn import functional as F
from transformer_lens.hook_points import HookPoint

from mmlens.model.components.rotary import apply_rotary

KeyValue = tuple[Tensor, Tensor]
"""Rotated keys and values of earlier positions, each ``[batch, n_kv_heads, pos, d_head]``."""


class Attention(nn.Module):
    """``z = softmax(mask(q k^T * scale)) v``; ``out = z W_O + b_O``; ``scale`` is
    ``d_head ** -0.5`` unless given (Gemma: ``query_pre_attn_scalar ** -0.5``).

    Options: ``qk_norm`` (a norm module each for queries and keys, applied per head before
    rotary: Qwen3's RMSNorm, Gemma 3's ``x * (1 + w)``), ``softcap`` (scores become
    ``softcap * tanh(scores / softcap)`` before the mask, Gemma 2; it always takes the explicit
    path, SDPA has no such step).

    Hooks (TransformerLens names and shapes): ``hook_q`` ``[batch, pos, n_heads, d_head]``,
    ``hook_k``/``hook_v`` ``[batch, pos, n_kv_heads, d_head]``, ``hook_rot_q``/``hook_rot_k``
    (after rotary, language only), ``hook_mask`` ``[batch, 1, q_pos, k_pos]`` (True = may
    attend), ``hook_attn_scores``/``hook_pattern`` ``[batch, n_heads, q_pos, k_pos]``,
    ``hook_z`` ``[batch, q_pos, n_heads, d_head]``; with ``qk_norm`` also ``hook_q_normed`` /
    ``hook_k_normed`` (after ``q_norm.*`` / ``k_norm.*``, before rotary); with
    ``set_use_attn_result(True)`` also
    ``hook_result`` ``[batch, q_pos, n_heads, d_model]`` (each head's output; their sum over
    heads plus ``b_O`` is the attention output).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_head: int,
        n_kv_heads: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
        rotary: bool = False,
        scale: float | None = None,
        softcap: float | None = None,
        qk_norm: tuple[nn.Module, nn.Module] | None = None,
    ):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_head
        self.scale = d_head**-0.5 if scale is None else scale
        self.softcap = softcap
        self.n_kv_heads = n_kv_heads or n_heads
        self.rotary = rotary
        self.q_weight = nn.Parameter(torch.empty(n_heads * d_head, d_model))
        self.k_weight = nn.Parameter(torch.empty(self.n_kv_heads * d_head, d_model))
        self.v_weight = nn.Parameter(torch.empty(self.n_kv_heads * d_head, d_model))
        self.o_weight = nn.Parameter(torch.empty(d_model, n_heads * d_head))
        self.q_bias = nn.Parameter(torch.zeros(n_heads * d_head)) if qkv_bias else None
        self.k_bias = nn.Parameter(torch.zeros(self.n_kv_heads * d_head)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(self.n_kv_heads * d_head)) if qkv_bias else None
        self.o_bias = nn.Parameter(torch.zeros(d_model)) if out_bias else None
        self.hook_q = HookPoint()  # [batch, pos, n_heads, d_head]
        self.hook_k = HookPoint()  # [batch, pos, n_kv_heads, d_head]
        self.hook_v = HookPoint()  # [batch, pos, n_kv_heads, d_head]
        self.qk_norm = qk_norm is not None
        if qk_norm is not None:
            self.q_norm, self.k_norm = qk_norm
            self.hook_q_normed = HookPoint()  # [batch, pos, n_heads, d_head]
            self.hook_k_normed = HookPoint()  # [batch, pos, n_kv_heads, d_head]
        if rotary:
            self.hook_rot_q = HookPoint()  # [batch, pos, n_heads, d_head]
            self.hook_rot_k = HookPoint()  # [batch, pos, n_kv_heads, d_head]
        self.hook_mask = HookPoint()  # [batch, 1, q_pos, k_pos], bool, True = may attend
        self.hook_attn_scores = HookPoint()  # [batch, n_heads, q_pos, k_pos]
        self.hook_pattern = HookPoint()  # [batch, n_heads, q_pos, k_pos]
        self.hook_z = HookPoint()  # [batch, q_pos, n_heads, d_head]
        self.use_attn_result = False

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute per-head outputs at ``hook_result`` (slower, more memory), or stop.

        The hook point exists only while enabled, so every hook name stays on the data path;
        the model's ``set_use_attn_result`` refreshes its hook names.
        """
        if use_attn_result and not self.use_attn_result:
            # in the model's train/eval mode: TL's patching refuses a module left in training
            self.hook_result = HookPoint().train(self.training)  # [batch, q_pos, n_heads, d_model]
        elif not use_attn_result and self.use_attn_result:
            del self.hook_result
        self.use_attn_result = bool(use_attn_result)

    # TransformerLens-shaped views of the weights.
    @property
    def W_Q(self) -> Float[Tensor, "n_heads d_model d_head"]:
        return rearrange(self.q_weight, "(h e) d -> h d e", h=self.n_heads)

    @property
    def W_K(self) -> Float[Tensor, "n_kv_heads d_model d_head"]:
        return rearrange(self.k_weight, "(h e) d -> h d e", h=self.n_kv_heads)

    @property
    def W_V(self) -> Float[Tensor, "n_kv_heads d_model d_head"]:
        return rearrange(self.v_weight, "(h e) d -> h d e", h=self.n_kv_heads)

    @property
    def W_O(self) -> Float[Tensor, "n_heads d_head d_model"]:
        return rearrange(self.o_weight, "d (h e) -> h e d", h=self.n_heads)

    @property
    def b_O(self) -> Float[Tensor, " d_model"]:
        return self.o_bias if self.o_bias is not None else self.o_weight.new_zeros(
            self.o_weight.shape[0])

    def _needs_explicit_pattern(self) -> bool:
        return self.softcap is not None or any(
            hook.fwd_hooks or hook.bwd_hooks for hook in (self.hook_attn_scores, self.hook_pattern)
        )

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        *,
        mask: Bool[Tensor, "batch 1 q_pos k_pos"] | None = None,
        causal: bool = False,
        rotary: tuple[Tensor, Tensor] | None = None,
        past_key_value: KeyValue | None = None,
    ) -> tuple[Float[Tensor, "batch pos d_model"], KeyValue]:
        """Attend from the positions of ``x`` to the past keys/values and to ``x`` itself.

        ``mask`` None means "all edges allowed" (plus causal order when ``causal``); a hook on
        ``hook_mask`` always receives a materialised mask. Returns the output and the full
        (past + new) rotated keys and values for a key/value cache.
        """
        batch, q_len, _ = x.shape
        q = self.hook_q(F.linear(x, self.q_weight, self.q_bias).view(batch, q_len, -1, self.d_head))
        k = self.hook_k(F.linear(x, self.k_weight, self.k_bias).view(batch, q_len, -1, self.d_head))
        v = self.hook_v(F.linear(x, self.v_weight, self.v_bias).view(batch, q_len, -1, self.d_head))
        if self.qk_norm:
            q = self.hook_q_normed(self.q_norm(q))
            k = self.hook_k_normed(self.k_norm(k))
        if self.rotary:
            cos, sin = rotary
            q = self.hook_rot_q(apply_rotary(q, cos, sin))
            k = self.hook_rot_k(apply_rotary(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if past_key_value is not None:
            k = torch.cat([past_key_value[0], k], dim=2)
            v = torch.cat([past_key_value[1], v], dim=2)
        present = (k, v)
        k_len = k.shape[2]
        if self.hook_mask.fwd_hooks:
            if mask is None:
                mask = default_mask(batch, q_len, k_len, causal, x.device)
            mask = self.hook_mask(mask.clone())
        elif mask is None and causal and q_len != k_len:
            mask = default_mask(batch, q_len, k_len, causal, x.device)
        use_causal_flag = mask is None and causal

        if self._needs_explicit_pattern():
            z = self._explicit(q, k, v, mask, use_causal_flag)
        else:
            grouped = self.n_kv_heads != self.n_heads
            if grouped and mask is not None and q.device.type != "cpu":
                # SDPA's fused GPU kernels take grouped heads only without a mask (CUDA falls
                # back to the math kernel otherwise); repeat the heads as Hugging Face does.
                # The CPU kernel takes both, with the same numbers, and no copy of the keys.
                repeats = self.n_heads // self.n_kv_heads
                k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
                grouped = False
            z = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=use_causal_flag, scale=self.scale,
                enable_gqa=grouped,
            )
        z = self.hook_z(z.transpose(1, 2))  # [batch, q_pos, n_heads, d_head]
        if self.use_attn_result:
            # Only when asked: [batch, pos, n_heads, d_model] costs n_heads times the output.
            result = self.hook_result(torch.einsum("bqhe,hed->bqhd", z, self.W_O))
            return result.sum(-2) + self.b_O, present
        out = F.linear(z.reshape(batch, q_len, -1), self.o_weight, self.o_bias)
        return out, present

    def _explicit(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool
    ) -> Tensor:
        repeats = self.n_heads // self.n_kv_heads
        if repeats > 1:
            k = k.repeat_interleave(repeats, dim=1)
            v = v.repeat_interleave(repeats, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if causal:
            mask = default_mask(q.shape[0], q.shape[2], k.shape[2], True, q.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        scores = self.hook_attn_scores(scores)
        pattern = self.hook_pattern(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype))
        return torch.matmul(pattern, v)


def default_mask(
    batch: int, q_len: int, k_len: int, causal: bool, device: torch.device
) -> Bool[Tensor, "batch 1 q_pos k_pos"]:
    """All edges allowed, or causal order where the queries are the last ``q_len`` keys."""
    if not causal:
        return torch.ones(batch, 1, q_len, k_len, dtype=torch.bool, device=device)
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    allowed = torch.arange(k_len, device=device)[None, :] <= q_pos[:, None]
    return allowed.expand(batch, 1, q_len, k_len)
