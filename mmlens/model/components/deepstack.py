"""Qwen3-VL's DeepStack: vision features added into the residual stream of the first decoder
layers, at the image tokens.

The vision blocks listed in ``deepstack_visual_indexes`` each feed their own patch merger
(``deepstack.{j}``, LayerNorm after the 2x2 concatenation); the ``j``-th of them, in block
order, is added to the output of decoder block ``j``::

    blocks.{j}: resid_mid + mlp_out ─▶ + hook_deepstack ─▶ hook_resid_post
"""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from mmlens.model.components.blocks import LanguageBlock
from mmlens.model.config import LanguageConfig


class DeepStackBlock(LanguageBlock):
    """A decoder block whose output also receives injected vision features.

    ``hook_deepstack`` ``[batch, pos, d_model]``: the features added to the block's output,
    zero off the image tokens; it fires only on runs that inject (a prompt with images, not a
    cached decoding step), and what it returns is what is added, so zeroing it removes the
    injection. ``hook_resid_post`` includes the injection (it is the next block's
    ``hook_resid_pre``).
    """

    def __init__(self, cfg: LanguageConfig):
        super().__init__(cfg)
        del self.hook_resid_post  # re-registered after hook_deepstack: hook names in data order
        self.hook_deepstack = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def _add_injection(self, resid: Float[Tensor, "batch pos d_model"],
                       inject: Tensor | None) -> Tensor:
        if inject is None:
            return resid
        return resid + self.hook_deepstack(inject.to(resid.device, resid.dtype))
