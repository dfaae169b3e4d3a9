"""Hugging Face's own model as the reference: its layer inputs and outputs, and its eager
attention with an edited mask (the knockout reference), for any family whose decoder layers
are ``hf.model.language_model.layers``."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def hf_run(hf, inputs: dict, vision_layers: Sequence[torch.nn.Module],
           decoder_layers: Sequence[torch.nn.Module] | None = None) -> tuple[object, dict]:
    """HF's output, the outputs of ``vision_layers`` and every decoder layer's input and
    output, in call order (``decoder_layers``: default ``hf.model.language_model.layers``)."""
    seen = {"vision": [], "pre": [], "post": []}
    handles = [b.register_forward_hook(lambda m, a, out: seen["vision"].append(out))
               for b in vision_layers]
    for layer in hf.model.language_model.layers if decoder_layers is None else decoder_layers:
        handles.append(layer.register_forward_pre_hook(
            lambda m, args, kwargs: seen["pre"].append(args[0] if args else
                                                       kwargs["hidden_states"]),
            with_kwargs=True))
        handles.append(layer.register_forward_hook(lambda m, a, out: seen["post"].append(out)))
    try:
        with torch.no_grad():
            out = hf(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return out, seen


def hf_knockout_logits(hf, inputs: dict, layers: Sequence[int], sources: Sequence[torch.Tensor],
                       target: int, n_heads: int) -> torch.Tensor:
    """HF's logits with the edges from ``sources[i]`` (positions of example ``i``) to position
    ``target`` removed from the eager attention mask of ``layers``."""
    n = inputs["input_ids"].shape[0]

    def edit(module, args, kwargs):
        mask = kwargs["attention_mask"]
        q_len = kwargs["hidden_states"].shape[1]
        mask = mask.expand(n, n_heads, q_len, q_len).clone()
        for i, source in enumerate(sources):
            mask[i, :, target, source] = torch.finfo(mask.dtype).min
        kwargs["attention_mask"] = mask
        return args, kwargs

    handles = [hf.model.language_model.layers[layer].self_attn.register_forward_pre_hook(
        edit, with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            return hf(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()
