"""Text generation with images, a key/value cache and whatever hooks are active."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mmlens.core.errors import MMLensError
from mmlens.inputs.batch import MultimodalBatch
from mmlens.model.kv_cache import KeyValueCache


@torch.no_grad()
def generate(
    model: Any,
    input: MultimodalBatch | Tensor | str | list[str],
    pixel_values: Tensor | None = None,
    *,
    attention_mask: Tensor | None = None,
    image_sizes: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    max_new_tokens: int = 10,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_at_eos: bool = True,
    eos_token_id: int | None = None,
    fwd_hooks: list[tuple[Any, Any]] | None = None,
    use_past_kv_cache: bool = True,
    seed: int | None = None,
    verbose: bool = False,
    return_type: str = "input",
) -> Tensor | str | list[str]:
    """Continue the prompt, as TransformerLens's ``generate``.

    ``input``: a ``MultimodalBatch``, ``input_ids [batch, pos]`` (with ``pixel_values``), or
    text (a string or list of strings; no image). Greedy by default; ``do_sample=True``
    samples with ``temperature``, ``top_k`` and ``top_p`` (nucleus). ``stop_at_eos``: rows that
    produced ``eos_token_id`` (default: the tokenizer's) get it as padding and the loop stops
    once all have; False generates ``max_new_tokens`` regardless. ``verbose`` shows a progress
    bar. ``return_type``: ``"tokens"`` (prompt + new, ``[batch, pos + new]``), ``"str"`` (the
    decoded prompt + continuation, special tokens such as the image token left out; one string
    for one text input) or ``"input"`` (strings for text input, tokens otherwise).

    ``token_type_ids``: the processor's token kinds of the prompt, for a family whose mask reads
    them (Gemma 3, PaliGemma); they go with the prompt's step, and the tokens generated after
    it are text (needs the key/value cache).

    The image is encoded once; later steps read the key/value cache. ``fwd_hooks`` (and hooks
    already added) are active at every step; with the cache a step's hooks see only the new
    position.
    """
    if return_type not in ("input", "tokens", "str"):
        raise ValueError(f"return_type={return_type!r} is not known: use 'input', 'tokens' or "
                         "'str'")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    text_input = isinstance(input, str | list | tuple)
    single_text = isinstance(input, str)
    if text_input:
        encoded = model._require_tokenizer()(input if single_text else list(input),
                                             return_tensors="pt", padding=True,
                                             padding_side="left")
        device = model.embed.W_E.device
        input = encoded["input_ids"].to(device)
        attention_mask = encoded["attention_mask"].to(device)
    if return_type == "input":
        return_type = "str" if text_input else "tokens"
    if token_type_ids is not None and not use_past_kv_cache:
        raise MMLensError("token_type_ids cover the prompt only: generate with "
                          "use_past_kv_cache=True, or leave them out")
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
    if not stop_at_eos:
        eos_token_id = None
    generator = None
    if seed is not None:
        generator = torch.Generator(device=tokens.device).manual_seed(seed)
    cache = KeyValueCache.empty(model.cfg.n_layers) if use_past_kv_cache else None
    finished = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    step_input, step_mask, step_pixels = tokens, attention_mask, pixel_values
    step_types = token_type_ids
    steps = range(max_new_tokens)
    if verbose:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="generate")
    with model.hooks(fwd_hooks=fwd_hooks or []):
        for _ in steps:
            logits = model(step_input, step_pixels, attention_mask=step_mask,
                           image_sizes=image_sizes, past_kv_cache=cache,
                           token_type_ids=step_types)[:, -1]
            # The image placeholder is never text: a generated one could not be embedded
            # (past the logits on Llama-3.2-Vision, where it is an input embedding only).
            if model.cfg.image_token_id < logits.shape[-1]:
                logits[:, model.cfg.image_token_id] = float("-inf")
            next_token = _choose(logits, do_sample, temperature, top_k, top_p,
                                 generator).to(tokens.device)
            if eos_token_id is not None:
                pad = eos_token_id
                next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
                finished |= next_token == eos_token_id
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_token[:, None])], 1)
            if cache is not None:
                step_input, step_mask, step_pixels = next_token[:, None], torch.ones_like(
                    next_token[:, None]), None
                step_types = None
            else:
                step_input, step_mask = tokens, attention_mask
            if eos_token_id is not None and bool(finished.all()):
                break
    if return_type == "str":
        texts = model.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return texts[0] if single_text else texts
    return tokens


def _choose(logits: Tensor, do_sample: bool, temperature: float, top_k: int | None,
            top_p: float | None, generator: torch.Generator | None) -> Tensor:
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-6)
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        logits = nucleus(logits, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def nucleus(logits: Float[Tensor, "batch d_vocab"], top_p: float) -> Float[Tensor, "batch d_vocab"]:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p``."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)
    drop_sorted = before >= top_p  # mass strictly before a token already reaches top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
