"""What enters ``HookedMultimodalTransformer.forward`` and ``generate``, checked and normalised.

The model's door: text is tokenized, a prepared ``MultimodalBatch`` is unpacked, a processor's
outputs under Hugging Face's names (``mmlens.model.processor_inputs``) become ``forward``'s
arguments, the attention mask takes the batch's shape and the cache's past, and a run resumed
at a layer is refused where it would skip the image (cross-attention layers, DeepStack
additions). The model's forward then only runs the network.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmlens.core.errors import MMLensError
from mmlens.inputs.batch import MultimodalBatch
from mmlens.model.config import MultimodalConfig
from mmlens.model.kv_cache import KeyValueCache
from mmlens.model.processor_inputs import CHECKED_NAMES, read_processor_outputs, refuse_unread


def forward_inputs(
    model: Any, input: Any, *, pixel_values: Tensor | None, attention_mask: Tensor | None,
    image_sizes: Tensor | None, token_type_ids: Tensor | None,
    processor_outputs: dict[str, Any],
) -> tuple[Any, Tensor | None, Tensor | None, Tensor | None]:
    """``(input, pixel_values, attention_mask, image_sizes)`` of a ``forward`` call: HF-named
    keywords read, text tokenized (with BOS), a ``MultimodalBatch`` unpacked; arguments given
    explicitly win over the batch's."""
    family = model.family
    if token_type_ids is not None:
        refuse_unread("token_type_ids", family.name, family.image_sizes_key,
                      family.processor_keys)
    if processor_outputs:
        input, image_sizes = read_hf_keywords(
            model, input, processor_outputs, pixel_values=pixel_values,
            attention_mask=attention_mask, image_sizes=image_sizes)
    if input is None:
        raise MMLensError("no input: pass input_ids (or a prepared batch, or text), e.g. "
                          "model(**processor(images=..., text=...))")
    if isinstance(input, str) or (isinstance(input, list | tuple) and input
                                  and all(isinstance(t, str) for t in input)):
        input = model.to_tokens(list(input) if not isinstance(input, str) else input)
        input = input.to(model.embed.W_E.device)
    if isinstance(input, MultimodalBatch):
        attention_mask = input.attention_mask if attention_mask is None else attention_mask
        pixel_values = input.pixel_values if pixel_values is None else pixel_values
        image_sizes = input.image_sizes if image_sizes is None else image_sizes
        input = input.input_ids
    return input, pixel_values, attention_mask, image_sizes


def read_hf_keywords(model: Any, input: Any, outputs: dict[str, Any], *,
                     pixel_values: Tensor | None, attention_mask: Tensor | None,
                     image_sizes: Tensor | None) -> tuple[Any, Tensor | None]:
    """``input`` and ``image_sizes`` from HF-named keywords (``input_ids``, the family's
    geometry key), the rest checked (``mmlens.model.processor_inputs``)."""
    family = model.family
    given = {"pixel_values": pixel_values, "attention_mask": attention_mask,
             "image_sizes": image_sizes, **outputs}
    given = {k: v for k, v in given.items() if v is not None}
    read = read_processor_outputs(
        given, sizes_key=family.image_sizes_key, image_token_id=model.cfg.image_token_id,
        family=family.name, family_keys=family.processor_keys + family.derived_names)
    family.check_derived(model, {**given, **read})
    if "input_ids" in read:
        if input is not None:
            raise MMLensError("got input and input_ids: pass the tokens once")
        input = read["input_ids"]
    return input, read.get("image_sizes")


def generate_inputs(model: Any, input: Any, pixel_values: Tensor | None,
                    kwargs: dict[str, Any]) -> Any:
    """``input`` of a ``generate`` call with HF-named keywords read: they are taken out of
    ``kwargs`` and ``kwargs["image_sizes"]`` set from them."""
    family = model.family
    hf_names = {"input_ids", family.image_sizes_key, *CHECKED_NAMES,
                *family.derived_names} - {"image_sizes"}
    outputs = {k: kwargs.pop(k) for k in list(kwargs) if k in hf_names}
    if outputs:
        input, kwargs["image_sizes"] = read_hf_keywords(
            model, input, outputs, pixel_values=pixel_values,
            attention_mask=kwargs.get("attention_mask"), image_sizes=kwargs.get("image_sizes"))
    return input


def check_input_ids(input: Any, injections: dict[int, Tensor] | None) -> None:
    """A run from ``input_ids``: an integer ``[batch, pos]`` tensor, and no ``injections``."""
    if input.ndim != 2 or input.dtype not in (torch.long, torch.int):
        raise ValueError("input_ids must be an integer tensor [batch, pos]; to resume "
                         "from a residual stream pass start_at_layer")
    if injections is not None:
        raise ValueError("injections= resumes a run (with start_at_layer); a run from "
                         "input_ids computes its own from the images")


def check_resume(cfg: MultimodalConfig, start_at_layer: int, stop_at_layer: int | None,
                 past_kv_cache: KeyValueCache | None,
                 injections: dict[int, Tensor] | None) -> None:
    """Refuse a run resumed at ``start_at_layer`` that would skip the image: a cross-attention
    layer ahead with no cache holding the image keys, or DeepStack additions not passed."""
    stop = cfg.text.n_layers if stop_at_layer is None else stop_at_layer
    held = past_kv_cache is not None and past_kv_cache.cross is not None
    if not held and any(start_at_layer <= layer < stop
                        for layer in cfg.text.cross_attention_layers):
        raise MMLensError(
            f"resuming at layer {start_at_layer} would skip the image in the "
            f"cross-attention layers {list(cfg.text.cross_attention_layers)}: "
            "resume after the last of them, on a key/value cache of a run with the "
            "image (it holds the image keys), or run from input_ids")
    if injections is None and start_at_layer < cfg.text.deepstack_layers:
        raise MMLensError(
            f"resuming at layer {start_at_layer} skips the image features DeepStack "
            f"adds after blocks 0-{cfg.text.deepstack_layers - 1}: pass "
            "injections={layer: the run's blocks.{layer}.hook_deepstack activation} "
            "for the layers from start_at_layer on (sliced to the resumed positions), "
            "or injections={} for a prompt without images")


def full_attention_mask(attention_mask: Tensor | None, resid: Tensor,
                        past_kv_cache: KeyValueCache | None) -> Tensor:
    """The ``[batch, past + pos]`` long mask of a run on ``resid [batch, pos, ...]``: all ones
    when none is given, the cache's past prepended."""
    batch, q_len = resid.shape[:2]
    if attention_mask is None:
        attention_mask = torch.ones(batch, q_len, dtype=torch.long, device=resid.device)
    elif attention_mask.shape[0] != batch:
        raise ValueError(f"attention_mask has batch size {attention_mask.shape[0]} but the "
                         f"input has {batch}: give one mask row per example")
    elif attention_mask.dtype != torch.long:
        attention_mask = attention_mask.long()
    if past_kv_cache is not None:
        attention_mask = past_kv_cache.extend_mask(attention_mask)
    return attention_mask
