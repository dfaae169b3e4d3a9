"""What a stored row depends on, as short digests: a resumed run refuses when any of them moved.

    study_signature(model, source.digests())
    # {"model": "8 layers, d_model 256, float32", "weights": "1f..", "config": "9c..",
    #  "processor.tokenizer": "41..", ..., "examples.images": "7d..", "mmlens.source": "a0.."}

Everything is hashed by content, never by where it was read from: the tokenizer as its whole
``tokenizer.json``, the processor's settings, the image bytes, the source of the installed
mmlens package (every ``.py`` file by relative path).

``weights_checksum`` covers every element of every parameter and buffer, computed where the
tensor lives: each tensor's raw 16-bit words ``v_i`` give ``sum v_i`` and ``sum v_i * w_i mod
p`` with ``p = 2**31 - 1`` (prime) and position weights ``1 <= w_i < p``. Integer arithmetic is
exact, so the digest is the same on any device and in any reduction order, and a change of any
one element changes ``v_i`` by ``0 < |d| < 2**16``, so ``d * w_i`` is not a multiple of ``p``:
a single edited element is always detected. A 7B model in 16 bits costs a few passes over its
memory on its GPU, no copy to the host.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Sequence
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Shaped
from torch import Tensor

from mmlens.core.sizes import as_image_size
from mmlens.model.protocol import HookedModel

PRIME = 2**31 - 1
CHUNK = 1 << 22  # elements per pass: bounds the temporary memory on the device
METRIC = ("p = softmax(logits[last])[answer token]; rel_change = (p_block - p_base) / p_base * "
          "100; filter: greedy answer strip().lower() == gold strip().lower()")
SUB_PROCESSORS = ("tokenizer", "image_processor", "video_processor", "feature_extractor")
# Fields that say where a config was read from, not what it holds: another folder, same run.
LOCATION_KEYS = ("_name_or_path", "name_or_path", "transformers_version", "vocab_file",
                 "merges_file", "tokenizer_file", "is_local", "local_files_only", "_commit_hash")


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


def study_signature(model: HookedModel, examples: dict[str, Any]) -> dict[str, Any]:
    """The signature's entries for the model, its processor, the examples (``examples``:
    ``ExampleSource.digests()``) and the code: contents only, no path, so the same weights, data
    and code read from another folder resume the same store."""
    return {"kind": "information_flow", "model": model_shape(model),
            "weights": weights_checksum(model), "config": config_digest(model),
            **processor_digests(model), **examples, **code_digests(), "metric": METRIC}


def model_shape(model: HookedModel) -> str:
    """Layers, width and dtype, for people to read (``weights`` identifies the model)."""
    dtype = str(model.embed.W_E.dtype).replace("torch.", "")
    return f"{model.cfg.n_layers} layers, d_model {model.cfg.d_model}, {dtype}"


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
    return _digest([_settings(hf_config.to_dict())])


def processor_digests(model: HookedModel) -> dict[str, str]:
    """The processor by content, one digest per part, so a refusal names the part that moved:
    ``tokenizer`` (the whole ``tokenizer.json``: vocabulary, merges, normalizer, pre-tokenizer,
    post-processor, decoder), ``tokenizer_config`` (``tokenizer_config.json`` less the fields
    that say where it was read from), ``special_tokens``, ``chat_template``, ``image`` and
    ``video`` (those processors' settings) and ``config`` (the processor's own settings)."""
    processor = getattr(model, "processor", None)
    if processor is None:
        return {"processor": "none"}
    tokenizer = getattr(processor, "tokenizer", None)
    parts = {"config": _settings(_as_dict(processor), leave_out=SUB_PROCESSORS)}
    for attribute in SUB_PROCESSORS[1:]:
        part = getattr(processor, attribute, None)
        if part is not None:
            parts[attribute.split("_")[0]] = _settings(_as_dict(part))
    chat_template = getattr(processor, "chat_template", None)
    if tokenizer is not None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        parts["tokenizer"] = (backend.to_str() if backend is not None
                              else json.dumps(sorted(tokenizer.get_vocab().items())))
        parts["tokenizer_config"] = _settings({k: v for k, v in tokenizer.init_kwargs.items()
                                               if k != "chat_template"})
        parts["special_tokens"] = json.dumps(
            [tokenizer.special_tokens_map, sorted(map(str, tokenizer.all_special_ids)),
             {str(i): str(t) for i, t in tokenizer.added_tokens_decoder.items()}],
            sort_keys=True, default=str)
        chat_template = chat_template or getattr(tokenizer, "chat_template", None)
    parts["chat_template"] = json.dumps(chat_template, sort_keys=True, default=str)
    return {f"processor.{name}": _digest([text]) for name, text in parts.items()}


def _as_dict(part: Any) -> dict[str, Any]:
    """A Hugging Face processor's settings; a processor of another kind: its class only."""
    to_dict = getattr(part, "to_dict", None)
    return to_dict() if callable(to_dict) else {"class": type(part).__qualname__}


def _settings(settings: dict[str, Any], leave_out: Sequence[str] = ()) -> str:
    """Settings as JSON, less the fields that name where they were read from."""
    kept = {k: v for k, v in settings.items() if k not in LOCATION_KEYS and k not in leave_out}
    return json.dumps(kept, sort_keys=True, default=str)


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
    digests["examples.image_sizes"] = _digest(json.dumps(_recorded_size(r)) for r in records)
    return digests


@functools.cache
def source_digest(root: str | Path | None = None) -> str:
    """The mmlens package's source: every ``.py`` file under ``root`` (default: the installed
    package), by path relative to it and content. The same code installed elsewhere gives the
    same digest; computed once per process, as the code it describes is loaded once."""
    root = Path(root) if root is not None else Path(str(resources.files("mmlens")))
    files = sorted(path for path in root.rglob("*.py") if "__pycache__" not in path.parts)
    return _digest(part for path in files
                   for part in (path.relative_to(root).as_posix(), path.read_bytes()))


def _recorded_size(record: Any) -> list[int] | None:
    """The image size the data records (a scene graph's width and height): the boxes are in
    its pixels."""
    size = getattr(record, "image_size", None)
    if size is None:
        return None
    size = as_image_size(size, f"recorded image size of {getattr(record, 'example_id', '?')!r}")
    return [int(size.width), int(size.height)]


def version_of(package: str) -> str | None:
    """The installed version of ``package``; None when it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def code_digests() -> dict[str, Any]:
    """The signature's entries for the code that computes the rows."""
    return {"mmlens.version": version_of("mmlens"), "mmlens.source": source_digest()}


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
