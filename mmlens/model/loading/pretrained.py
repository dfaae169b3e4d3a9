"""Name resolution and loading: bundled short names, local folders and hub names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def _family(model_type: str | None) -> Any:
    # Imported here: the family adapters import this package's converters.
    from mmlens.model.families import family_for

    return family_for(model_type)


def _resolve(name_or_path: str) -> str:
    from mmlens.zoo.registry import resolve_bundled

    bundled = resolve_bundled(name_or_path)
    return str(bundled) if bundled is not None else name_or_path


def _hf_model_class(model_type: str) -> Any:
    """The transformers class of the checkpoint's family; raises listing the families."""
    return _family(model_type).hf_model_class()


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not one of float32, float16, bfloat16") from None


def convert_hf_model(cls: type, hf_model: Any, processor: Any = None) -> Any:
    """Build ours from an in-memory HF model; weights are shared, not copied."""
    family = _family(getattr(hf_model.config, "model_type", None))
    cfg = family.read_config(hf_model.config)
    state = family.convert_state_dict(hf_model.state_dict(), cfg)
    first = next(iter(state.values()))
    with torch.device("meta"):
        model = cls(cfg, processor=processor)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(first.dtype).eval()


def load_pretrained(cls: type, name_or_path: str, *, dtype: torch.dtype | str | None = None,
                    device: str | torch.device | None = None,
                    trust_remote_code: bool = False, **hf_kwargs: Any) -> Any:
    """Load via Hugging Face (safetensors weights), then convert."""
    import transformers

    path = _resolve(name_or_path)
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        model_type = json.loads(config_file.read_text()).get("model_type")
    else:
        model_type = transformers.AutoConfig.from_pretrained(
            path, trust_remote_code=trust_remote_code).model_type
    hf_cls = _hf_model_class(model_type)
    hf_model = hf_cls.from_pretrained(
        path, dtype=_as_dtype(dtype) or "auto", use_safetensors=True,
        trust_remote_code=trust_remote_code, **hf_kwargs,
    )
    processor = _family(model_type).load_processor(path, trust_remote_code=trust_remote_code)
    model = convert_hf_model(cls, hf_model, processor)
    if device is not None:
        model = model.to(device)
    return model.eval()
