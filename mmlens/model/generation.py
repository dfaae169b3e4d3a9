"""Text generation with images, a key/value cache and whatever hooks are active."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmlens.inputs.batch import MultimodalBatch
from mmlens.model.kv_cache import KeyValueCache


@torch.no_grad()
def generate(
    model: Any,
    input: MultimodalBatch | Tensor,
    pixel_values: Tensor | None = None,
    *,
    attention_mask: Tensor | None = None,
    image_sizes: Tensor | None = None,
    max_new_tokens: int = 10,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | None = None,
    fwd_hooks: list[tuple[Any, Any]] | None = None,
    use_past_kv_cache: bool = True,
    seed: int | None = None,
    return_type: str = "tokens",
) -> Tensor | list[str]:
    """Continue the prompt; ``[batch, pos + new]`` tokens, or the new text when
    ``return_type="str"``.

    Greedy by default; ``do_sample=True`` samples with ``temperature`` / ``top_k``. The image is
    encoded once; later steps read the key/value cache. ``fwd_hooks`` (and hooks already added)
    are active at every step; note that with the cache a step's hooks see only the new position.
    """
    if isinstance(input, MultimodalBatch):
        attention_mask = input.attention_mask if attention_mask is None else attention_mask
        pixel_values = input.pixel_values if pixel_values is None else pixel_values
        image_sizes = input.image_sizes if image_sizes is None else image_sizes
        input = input.input_ids
    tokens = input
    batch = tokens.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(tokens)
    if eos_token_id is None and model.tokenizer is not None:
        eos_token_id = model.tokenizer.eos_token_id
    generator = None
    if seed is not None:
        generator = torch.Generator(device=tokens.device).manual_seed(seed)
    cache = KeyValueCache.empty(model.cfg.n_layers) if use_past_kv_cache else None
    finished = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    step_input, step_mask, step_pixels = tokens, attention_mask, pixel_values
    with model.hooks(fwd_hooks=fwd_hooks or []):
        for _ in range(max_new_tokens):
            logits = model(step_input, step_pixels, attention_mask=step_mask,
                           image_sizes=image_sizes, past_kv_cache=cache)[:, -1]
            # The image placeholder is never text: a generated one could not be embedded.
            logits[:, model.cfg.image_token_id] = float("-inf")
            next_token = _choose(logits, do_sample, temperature, top_k, generator).to(tokens.device)
            if eos_token_id is not None:
                pad = eos_token_id
                next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
                finished |= next_token == eos_token_id
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_token[:, None])], 1)
            if cache is not None:
                step_input, step_mask, step_pixels = next_token[:, None], torch.ones_like(
                    next_token[:, None]), None
            else:
                step_input, step_mask = tokens, attention_mask
            if bool(finished.all()):
                break
    if return_type == "str":
        return model.tokenizer.batch_decode(tokens[:, input.shape[1]:], skip_special_tokens=True)
    return tokens


def _choose(logits: Tensor, do_sample: bool, temperature: float, top_k: int | None,
            generator: torch.Generator | None) -> Tensor:
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-6)
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
