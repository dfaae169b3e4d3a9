"""Small random checkpoints with their processors, for every registered family, offline.

Each family that mmlens supports has one module in this package, named as its registry key
(``Family.name``, the HF ``model_type``), saying how to build a tiny Hugging Face config and an
offline processor for it::

    HF_CLASS: str                       # the transformers class ("LlavaForConditionalGeneration")
    IMAGE_SIZES: tuple[ImageSize, ...]  # images the conformance suite runs (odd sizes, tiles)
    def hf_config(**overrides)          # tiny HF config: few layers, d_model <= 64, GQA
    def processor(hf_config)            # tokenizer + image processor + template, no download

and, optionally (the conformance suite and ``tiny_hf_model`` use defaults without them)::

    VARIANTS: dict[str, dict]           # named hf_config overrides parity is also checked on
    def perturb(model) -> None          # extra weight spread after the common one
    def hf_vision_rows(hf, inputs)      # our vision rows in HF's block order (Qwen2.5's windows)
    def hf_vision_layers(hf)            # HF's vision blocks, where the tower has several lists
    def hf_decoder_layers(hf)           # HF's decoder layers, if not model.language_model.layers

Modules whose name starts with ``_`` hold what several families share (``_qwen``).

``tiny_checkpoint(family, folder)`` writes the weights (every parameter perturbed, so norms and
biases are not trivial) and the processor; mmlens and HF's own class both load the folder. The
conformance suite (``tests/conformance``) runs every check on every module found here.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from mmlens.core.errors import MMLensError

__all__ = ["tiny_checkpoint", "tiny_families", "tiny_hf_model", "tiny_module", "tiny_processor"]

_HELPERS = {"tokenizer"}


def tiny_families() -> list[str]:
    """The family names that have a tiny builder, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__)
                  if m.name not in _HELPERS and not m.name.startswith("_"))


def tiny_module(family: str) -> ModuleType:
    """The builder module of ``family``; raises naming the families that have one."""
    if family not in tiny_families():
        raise MMLensError(f"no tiny builder for family {family!r}: "
                          f"choose one of {', '.join(tiny_families())}")
    return importlib.import_module(f"{__name__}.{family}")


def tiny_hf_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                  scale: float = 0.05, **overrides: Any) -> torch.nn.Module:
    """HF's own model of ``family`` on its tiny config, every weight perturbed by
    ``scale * N(0, 1)`` after the seeded init, in eval mode."""
    import transformers

    module = tiny_module(family)
    torch.manual_seed(seed)
    model = getattr(transformers, module.HF_CLASS)(module.hf_config(**overrides))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * scale)
        perturb = getattr(module, "perturb", None)  # optional: e.g. biases HF zeroes
        if perturb is not None:
            perturb(model)
    return model.to(dtype).eval()


def tiny_processor(family: str, hf_config: Any = None) -> Any:
    """The offline processor of ``family``'s tiny config."""
    module = tiny_module(family)
    return module.processor(hf_config if hf_config is not None else module.hf_config())


def tiny_checkpoint(family: str, folder: str | Path, seed: int = 0,
                    **overrides: Any) -> Path:
    """Write a small random checkpoint of ``family`` and its processor to ``folder``.

    The folder loads with ``HookedMultimodalTransformer.from_pretrained(folder)`` and with HF's
    own class; ``overrides`` go to the family's ``hf_config``.
    """
    folder = Path(folder)
    model = tiny_hf_model(family, seed=seed, **overrides)
    model.save_pretrained(folder)
    tiny_processor(family, model.config).save_pretrained(folder)
    return folder
