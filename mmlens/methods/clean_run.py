"""One clean pass of one example, kept for resuming: the residual stream entering every layer
and every layer's keys/values.

A method that changes the run only from layer ``a`` and position ``p`` on (a knockout whose
targets start at ``p``, a patch at positions ``>= p``) resumes from ``resid[a][:, p:]`` with
the cached keys/values of positions ``< p`` and gets exactly the numbers of a full forward
(``mmlens.experiments.engine`` runs the study's sweep this way; ``causal_map`` its image maps).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from mmlens.inputs.batch import MultimodalBatch
from mmlens.model.kv_cache import KeyValueCache
from mmlens.model.protocol import HookedModel


@dataclass
class CleanRun:
    """The unmodified run of one (unpadded) example.

    ``resid[l]`` is the residual stream entering layer ``l`` ``[1, pos, d_model]``; ``resid[L]``
    is the stream after the last layer. ``cache`` holds every layer's keys/values of the prompt
    (and of any tokens decoded after it). ``logits`` ``[d_vocab]`` (float32) is the prediction
    at the last prompt position. ``position_ids`` are the decoder positions the model's family
    gave the prompt (``[1, pos]``, or the family's own layout such as M-RoPE's); a knockout's
    suffix is recomputed at exactly these positions. ``token_type_ids`` are the token kinds
    the family's mask rule reads (Gemma 3's image tokens), None where it needs none.
    """

    resid: list[Tensor]
    cache: KeyValueCache
    logits: Float[Tensor, " d_vocab"]
    n_positions: int
    position_ids: Tensor
    injections: dict[int, Tensor] = field(default_factory=dict)
    """Features the family added after decoder blocks (Qwen3-VL's DeepStack), by layer
    ``[1, pos, d_model]``: a resumed suffix gets its slice of them."""
    token_type_ids: Tensor | None = None

    def prediction(self, exclude: int | None = None) -> int:
        """The argmax token at the last position, never ``exclude`` (the image token; past
        the logits where it is only an input embedding, as Llama-3.2-Vision's)."""
        logits = self.logits.clone()
        if exclude is not None and exclude < logits.shape[-1]:
            logits[exclude] = float("-inf")
        return int(logits.argmax())

    def prob(self, token: int) -> float:
        return float(self.logits.softmax(-1)[token])


def single_example(batch: MultimodalBatch, index: int = 0) -> MultimodalBatch:
    """Example ``index`` of ``batch`` on its own, without padding; refuses inner padding."""
    one = batch.select(index)
    if not bool(one.attention_mask.all()):
        raise ValueError(f"example {index} has padding inside its prompt: the knockout engine "
                         "needs left padding only, as model.prepare produces")
    return one


@torch.no_grad()
def clean_run(model: HookedModel, example: MultimodalBatch) -> CleanRun:
    """Run one unpadded example once, keeping per-layer residuals and keys/values."""
    n_layers = model.cfg.n_layers
    resid: list[Tensor | None] = [None] * (n_layers + 1)

    def keep(layer: int):
        def hook(tensor: Tensor, hook) -> None:
            resid[layer] = tensor.detach()

        return hook

    injections: dict[int, Tensor] = {}

    def keep_injection(tensor: Tensor, hook) -> None:
        injections[int(hook.name.split(".")[1])] = tensor.detach()

    hooks = [(f"blocks.{layer}.hook_resid_pre", keep(layer)) for layer in range(n_layers)]
    hooks.append((f"blocks.{n_layers - 1}.hook_resid_post", keep(n_layers)))
    hooks += [(name, keep_injection) for name in model.hook_dict
              if name.endswith(".hook_deepstack") and name.startswith("blocks.")]
    cache = KeyValueCache.empty(n_layers)
    with model.hooks(fwd_hooks=hooks):
        final = model(example.input_ids, example.pixel_values, image_sizes=example.image_sizes,
                      past_kv_cache=cache, stop_at_layer=n_layers)
    return CleanRun(resid=resid, cache=cache, logits=last_logits(model, final)[0],
                    n_positions=example.input_ids.shape[1], position_ids=cache.position_ids,
                    injections=injections,
                    token_type_ids=model.family.token_type_ids(model.cfg, example.input_ids))


def last_logits(model: HookedModel, final_resid: Float[Tensor, "batch pos d_model"]
                ) -> Float[Tensor, "batch d_vocab"]:
    """Float32 logits at the last position only (the sweep never reads the others)."""
    logits = model.unembed(model.ln_final(final_resid[:, -1:]))
    return model.family.final_logits(logits, model.cfg)[:, -1].float()
