"""Name resolution and loading: bundled short names, local folders and hub names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmlens.core.errors import MMLensError
from mmlens.model.loading.sources import hub_options, resolve_source, weight_problems


def _family(model_type: str | None) -> Any:
    # Imported here: the family adapters import this package's converters.
    from mmlens.model.families import family_for

    return family_for(model_type)


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
    cfg.model_name = getattr(hf_model.config, "_name_or_path", "") or cfg.model_type
    return model.to(first.dtype).eval()


def load_pretrained(cls: type, name_or_path: str, *, dtype: torch.dtype | str | None = None,
                    device: str | torch.device | None = None,
                    trust_remote_code: bool = False, **hf_kwargs: Any) -> Any:
    """Load via Hugging Face (safetensors weights), then convert.

    Refuses a checkpoint whose weights do not match its config (missing, unexpected or
    mis-shaped tensors) instead of filling the gaps with random values, and a processor that
    is there but fails to load.
    """
    import transformers

    path, is_local = resolve_source(name_or_path)
    hub_kwargs = {} if is_local else hub_options(path)
    config_file = Path(path) / "config.json"
    try:
        if config_file.is_file():
            model_type = json.loads(config_file.read_text()).get("model_type")
        elif is_local:
            raise MMLensError(f"{path} holds no config.json: pass the folder of a Hugging Face "
                              "LLaVA checkpoint (config.json, *.safetensors, processor files)")
        else:
            model_type = transformers.AutoConfig.from_pretrained(
                path, trust_remote_code=trust_remote_code, **hub_kwargs).model_type
        hf_cls = _hf_model_class(model_type)
        hf_model, info = hf_cls.from_pretrained(
            path, dtype=_as_dtype(dtype) or "auto", use_safetensors=True,
            trust_remote_code=trust_remote_code, output_loading_info=True, **hub_kwargs,
            **hf_kwargs,
        )
    except json.JSONDecodeError as err:
        raise MMLensError(f"{config_file} is not valid JSON ({err}): restore it from the "
                          "original checkpoint") from err
    except OSError as err:  # a missing or unreadable file
        raise MMLensError(f"cannot load the model {name_or_path}: {err}") from err
    problems = weight_problems(info)
    if problems:
        raise MMLensError(
            f"the weights of {name_or_path} do not match its config.json: {problems}. Loading "
            "would leave these tensors random (or unused): fix config.json (e.g. the number of "
            "layers) or the weight files"
        )
    processor = _family(model_type).load_processor(
        path, trust_remote_code=trust_remote_code, **hub_kwargs)
    model = convert_hf_model(cls, hf_model, processor)
    model.cfg.model_name = name_or_path
    if device is not None:
        model = model.to(device)
    return model.eval()
