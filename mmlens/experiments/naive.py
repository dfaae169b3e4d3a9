"""The reference knockout path: one full forward per knockout, as the paper's code does.

Every knockout re-encodes the image and recomputes the whole prompt with ``block_attention``
hooks. Slow, but with nothing clever in it, so it is what the fast engine
(``mmlens.experiments.engine``) is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mmlens.experiments.engine import last_logits
from mmlens.experiments.knockouts import Knockout
from mmlens.inputs.batch import MultimodalBatch
from mmlens.methods import block_attention, remove_deepstack
from mmlens.methods.cross_knockout import cross_key_hooks
from mmlens.methods.deepstack import deepstack_layers
from mmlens.model.protocol import HookedModel


def knockout_hooks(knockout: Knockout, model: HookedModel | None = None) -> list:
    """``block_attention`` hooks for one knockout (``remove_deepstack`` hooks for a
    ``deepstack->...`` one); none when it blocks nothing."""
    if knockout.is_empty:
        return []
    if knockout.removes_injection:
        layers = [layer for layer in knockout.layers if layer in deepstack_layers(model)]
        return remove_deepstack(model, layers, knockout.target) if layers else []
    if knockout.image_keys:  # the image's cross-attention keys (Llama-3.2-Vision)
        keys = [knockout.source] if knockout.key_source else None
        return cross_key_hooks(keys, knockout.target, knockout.layers,
                               model.cfg.text.cross_attention_layers)
    if model is not None and model.cfg.text.cross_attention_layers:  # self-attention layers
        return block_attention(knockout.source, knockout.target, list(knockout.layers),
                               model=model)
    return block_attention(knockout.source, knockout.target, list(knockout.layers))


@torch.no_grad()
def naive_knockout_probs(model: HookedModel, example: MultimodalBatch,
                         knockouts: Sequence[Knockout], token: int | Sequence[int]
                         ) -> Float[Tensor, " knockouts *tokens"]:
    """``p(token)`` at the last position under each knockout, one full forward each (a list
    of tokens gives ``[knockouts, tokens]``)."""
    tokens = [token] if isinstance(token, int) else list(token)
    probs = torch.empty(len(knockouts), len(tokens))
    for row, knockout in enumerate(knockouts):
        final = model.run_with_hooks(
            example.input_ids, example.pixel_values, attention_mask=example.attention_mask,
            image_sizes=example.image_sizes, stop_at_layer=model.cfg.n_layers,
            fwd_hooks=knockout_hooks(knockout, model),
        )
        probs[row] = last_logits(model, final)[0].softmax(-1)[tokens].cpu()
    return probs[:, 0] if isinstance(token, int) else probs
