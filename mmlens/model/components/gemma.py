"""Gemma's pieces: the ``x * (1 + w)`` RMSNorm, the scaled token embedding and the decoder layer
with norms before and after attention and MLP (Gemma 2 / Gemma 3)."""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from torch.nn import functional as F
from transformer_lens.hook_points import HookPoint

from mmlens.model.components.attention import Attention, KeyValue
from mmlens.model.components.mlp import GatedMLP


class GemmaRMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * (1 + w)``, all in float32, cast back at the end (as
    Gemma does, unlike Llama which casts before the weight).

    ``hook_scale`` ``[..., 1]`` is the divisor, ``hook_normalized`` the float32 quotient. The
    quotient is ``x * rsqrt(...)`` as Gemma computes it (bit for bit) unless a hook replaced
    the divisor, which then divides.
    """

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.zeros(d_model))
        self.hook_scale = HookPoint()  # [..., 1]
        self.hook_normalized = HookPoint()  # [..., d_model], float32

    @property
    def gain(self) -> Float[Tensor, " d_model"]:
        """What multiplies the normalised input: ``1 + w``."""
        return 1.0 + self.w

    def forward(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_model"]:
        dtype = x.dtype
        x = x.float()
        inverse = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        divisor = inverse.reciprocal()
        scale = self.hook_scale(divisor)
        normalized = self.hook_normalized(x * inverse if scale is divisor else x / scale)
        return (normalized * (1.0 + self.w.float())).to(dtype)


class ScaledEmbed(nn.Module):
    """``W_E[tokens] * sqrt(d_model)``, the factor rounded to the weights' dtype first (as
    Gemma's checkpoints were trained: 55.5 rather than 55.43 in bfloat16)."""

    def __init__(self, d_vocab: int, d_model: int):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(d_vocab, d_model))
        self.scale = d_model**0.5

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        factor = torch.tensor(self.scale, dtype=torch.float32).to(self.W_E.dtype)
        return F.embedding(tokens, self.W_E) * factor.to(self.W_E.device)


class GemmaBlock(nn.Module):
    """``resid_mid = resid_pre + ln1_post(attn(ln1(resid_pre)))``,
    ``resid_post = resid_mid + ln2_post(mlp(ln2(resid_mid)))``.

    Gemma (1) has no post-norms (``post_norms=False``: ``ln1_post`` / ``ln2_post`` pass through).
    ``hook_attn_out`` / ``hook_mlp_out`` are what is added to the residual stream (after the
    post-norms), so ``decompose_resid`` adds up. ``layer_type`` picks this layer's rotary
    tables when the stack hands a dict of them (``"sliding_attention"``, ``"full_attention"``).
    """

    def __init__(self, attn: Attention, mlp: GatedMLP, d_model: int, eps: float,
                 layer_type: str = "full_attention", post_norms: bool = True):
        super().__init__()
        self.layer_type = layer_type
        # Registered in data-flow order, which is the order of the model's hook names.
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.ln1 = GemmaRMSNorm(d_model, eps)
        self.attn = attn
        self.ln1_post = GemmaRMSNorm(d_model, eps) if post_norms else nn.Identity()
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.ln2 = GemmaRMSNorm(d_model, eps)
        self.mlp = mlp
        self.ln2_post = GemmaRMSNorm(d_model, eps) if post_norms else nn.Identity()
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(
        self,
        resid_pre: Float[Tensor, "batch pos d_model"],
        *,
        mask: Bool[Tensor, "batch 1 q_pos k_pos"] | None = None,
        causal: bool = False,
        rotary: tuple[Tensor, Tensor] | dict[str, tuple[Tensor, Tensor]] | None = None,
        past_key_value: KeyValue | None = None,
    ) -> tuple[Float[Tensor, "batch pos d_model"], KeyValue]:
        if isinstance(rotary, dict):
            rotary = rotary[self.layer_type]
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out, present = self.attn(self.ln1(resid_pre), mask=mask, causal=causal,
                                       rotary=rotary, past_key_value=past_key_value)
        resid_mid = self.hook_resid_mid(resid_pre + self.hook_attn_out(self.ln1_post(attn_out)))
        mlp_out = self.hook_mlp_out(self.ln2_post(self.mlp(self.ln2(resid_mid))))
        return self.hook_resid_post(resid_mid + mlp_out), present


class PooledProjector(nn.Module):
    """Gemma 3's projector: the tower's patch grid average-pooled to ``n_tokens`` (a square
    number), normed (``x * (1 + w)``) and projected to the text width, without bias.

    Hooks: ``hook_in`` ``[images, n_patches, d_vision]``, ``hook_pooled``
    ``[images, n_tokens, d_vision]``, ``norm.*``, ``hook_out`` ``[images, n_tokens, d_model]``
    (the image features merged into the token embeddings).
    """

    def __init__(self, d_vision: int, d_model: int, grid_size: int, n_tokens: int, eps: float):
        super().__init__()
        side = int(round(n_tokens**0.5))
        if side * side != n_tokens or grid_size % side:
            raise ValueError(f"{n_tokens} image tokens do not pool a {grid_size}x{grid_size} patch "
                             "grid evenly: mm_tokens_per_image must be a square whose side divides "
                             "image_size / patch_size")
        self.grid_size, self.kernel = grid_size, grid_size // side
        self.W = nn.Parameter(torch.zeros(d_vision, d_model))
        self.hook_in = HookPoint()  # [images, n_patches, d_vision]
        self.hook_pooled = HookPoint()  # [images, n_tokens, d_vision]
        self.norm = GemmaRMSNorm(d_vision, eps)
        self.hook_out = HookPoint()  # [images, n_tokens, d_model]

    def forward(
        self, x: Float[Tensor, "images n_patches d_vision"]
    ) -> Float[Tensor, "images n_tokens d_model"]:
        x = self.hook_in(x)
        images, _, d_vision = x.shape
        grid = x.transpose(1, 2).reshape(images, d_vision, self.grid_size, self.grid_size)
        pooled = F.avg_pool2d(grid.contiguous(), self.kernel, self.kernel)
        pooled = self.hook_pooled(pooled.flatten(2).transpose(1, 2))
        return self.hook_out(torch.matmul(self.norm(pooled), self.W).type_as(x))
