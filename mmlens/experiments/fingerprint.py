"""What a stored row depends on, as short digests: a resumed run refuses when any of them moved.

    study_signature(model, source, flows=..., window=..., ...)
    # {"model": "shapes-llava (8 layers, ...)", "weights": "sum 1f.. / weighted 3a..",
    #  "config": "9c..", "processor": "41..", "examples.images": "7d..", ..., "window": 3}

``weights_checksum`` covers every element of every parameter and buffer, computed where the
tensor lives: each tensor's raw 16-bit words ``v_i`` give ``sum v_i`` and ``sum v_i * w_i mod
p`` with ``p = 2**31 - 1`` (prime) and position weights ``1 <= w_i < p``. Integer arithmetic is
exact, so the digest is the same on any device and in any reduction order, and a change of any
one element changes ``v_i`` by ``0 < |d| < 2**16``, so ``d * w_i`` is not a multiple of ``p``:
a single edited element is always detected. A 7B model in 16 bits costs a few passes over its
memory on its GPU, no copy to the host.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Shaped
from torch import Tensor

from mmlens.model.protocol import HookedModel

PRIME = 2**31 - 1
CHUNK = 1 << 22  # elements per pass: bounds the temporary memory on the device
METRIC = ("p = softmax(logits[last])[answer token]; rel_change = (p_block - p_base) / p_base * "
          "100; filter: greedy answer strip().lower() == gold strip().lower()")
SPAN_MODULES = ("mmlens.inputs.spans", "mmlens.inputs.geometry", "mmlens.inputs.anyres_spans",
                "mmlens.inputs.tiling", "mmlens.inputs.templates")


def _digest(parts: Iterable[bytes | str]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: unambiguous
    return digest.hexdigest()[:16]


@torch.no_grad()
def tensor_checksum(tensor: Shaped[Tensor, "..."]) -> tuple[int, int]:
    """``(sum v_i, sum v_i * w_i mod p)`` over the tensor's raw 16-bit words, on its device."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.element_size() % 2 == 0 and flat.numel() > 0:
        words = flat.view(torch.int16)
    else:
        words = flat.view(torch.uint8)
    plain, weighted = 0, 0
    for start in range(0, words.numel(), CHUNK):
        chunk = words[start:start + CHUNK].to(torch.int64)
        positions = torch.arange(start, start + chunk.numel(), device=chunk.device) % PRIME
        weights = (positions * 48271) % (PRIME - 1) + 1  # in [1, p - 1]
        plain += int(chunk.sum())
        weighted += int(((chunk * weights) % PRIME).sum())
    return plain, weighted % PRIME


def weights_checksum(model: torch.nn.Module) -> str:
    """One digest of every parameter and buffer: names, shapes, dtypes and every element."""
    parts = []
    for kind, named in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            plain, weighted = tensor_checksum(tensor)
            parts.append(f"{kind} {name} {tuple(tensor.shape)} {tensor.dtype} {plain} {weighted}")
    return _digest(parts)


def config_digest(model: HookedModel) -> str:
    """The Hugging Face config, less the fields that name where it was read from."""
    hf_config = getattr(model.cfg, "hf_config", None)
    if hf_config is None:
        return _digest([repr(model.cfg)])
    settings = hf_config.to_dict()
    for key in ("_name_or_path", "transformers_version", "name_or_path"):
        settings.pop(key, None)
    return _digest([json.dumps(settings, sort_keys=True, default=str)])


def processor_digest(model: HookedModel) -> str:
    """Image-processor settings, chat template and the tokenizer's vocabulary."""
    processor = getattr(model, "processor", None)
    if processor is None:
        return "none"
    parts = []
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None:
        parts.append(json.dumps(image_processor.to_dict(), sort_keys=True, default=str))
    parts.append(str(getattr(processor, "chat_template", None)))
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        parts.append(json.dumps(sorted(tokenizer.get_vocab().items()), default=str))
        parts.append(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str))
    return _digest(parts)


def image_bytes(record: Any) -> bytes:
    """The bytes an example's image is made of: the file as stored, or the pixels in memory."""
    image = getattr(record, "image", None)
    if image is not None:
        if hasattr(image, "tobytes") and hasattr(image, "mode"):  # PIL
            return f"{image.mode} {image.size}".encode() + image.tobytes()
        array = np.asarray(image.cpu() if isinstance(image, torch.Tensor) else image)
        return f"{array.dtype} {array.shape}".encode() + array.tobytes()
    path = getattr(record, "image_path", None)
    if path is None:
        return b""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise FileNotFoundError(f"image of example {getattr(record, 'example_id', '?')!r} "
                                f"cannot be read at {path} ({err.strerror})") from err


def examples_digests(records: Sequence[Any] | None, ids: Sequence[str],
                     batch: Any = None) -> dict[str, Any]:
    """One digest per part of the examples, so a refusal can say which part changed."""
    digests: dict[str, Any] = {"examples.count": len(ids), "examples.ids": _digest(ids)}
    if records is None:
        tensors = [batch.input_ids, batch.attention_mask, batch.pixel_values]
        digests["examples.inputs"] = _digest(t.cpu().numpy().tobytes() for t in tensors
                                             if t is not None)
        digests["examples.spans"] = _digest(
            json.dumps({k: torch.as_tensor(v).tolist() for k, v in spans.items()},
                       sort_keys=True) for spans in batch.spans)
        return digests
    for field in ("question", "answer", "task", "wrong_answer"):
        digests[f"examples.{field}s"] = _digest(str(getattr(r, field, "")) for r in records)
    digests["examples.boxes"] = _digest(json.dumps([list(map(float, box)) for box in
                                                    getattr(r, "boxes", []) or []])
                                        for r in records)
    digests["examples.images"] = _digest(image_bytes(r) for r in records)
    return digests


def code_digest(modules: Sequence[str] = SPAN_MODULES) -> str:
    """The source of the modules that turn boxes into spans: a changed rule changes rows."""
    import importlib

    return _digest(inspect.getsource(importlib.import_module(name)) for name in modules)


def template_digest(template: Any) -> str | None:
    if template is None or isinstance(template, str):
        return template
    return f"{getattr(template, 'name', '')} {_digest([repr(template)])}"


def spans_digest(spans: Any) -> str | bool:
    """Extra spans given as ``{example_id: {name: positions}}``: their digest; a callable: True
    (its code cannot be compared); none: False."""
    if spans is None or callable(spans):
        return spans is not None
    return _digest([json.dumps({str(example): {name: torch.as_tensor(positions).tolist()
                                               for name, positions in named.items()}
                                for example, named in spans.items()}, sort_keys=True)])
