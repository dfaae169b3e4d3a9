"""Model families: one small adapter per line of checkpoints, looked up by HF model_type.

``FAMILIES`` maps every accepted Hugging Face ``model_type`` to its adapter; loading and the
hooked model ask it, nothing else branches on the model type. See ``docs/architecture.md``,
"How to add a model family".
"""

from __future__ import annotations

from typing import Any

from mmlens.model.config import MultimodalConfig
from mmlens.model.families.base import Family
from mmlens.model.families.gemma3 import Gemma3Family
from mmlens.model.families.idefics3 import Idefics3Family, SmolVLMFamily
from mmlens.model.families.internvl import InternVLFamily
from mmlens.model.families.llava import LlavaFamily
from mmlens.model.families.llava_next import LlavaNextFamily
from mmlens.model.families.mllama import MllamaFamily
from mmlens.model.families.onevision import LlavaOnevisionFamily
from mmlens.model.families.paligemma import PaliGemmaFamily
from mmlens.model.families.qwen3_vl import Qwen3VLFamily
from mmlens.model.families.qwen_vl import Qwen25VLFamily, QwenVLFamily

FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family under each HF model_type it accepts."""
    for model_type in family.model_types:
        FAMILIES[model_type] = family
    return family


for _family in (LlavaFamily(), LlavaNextFamily(), LlavaOnevisionFamily(), QwenVLFamily(),
                Qwen25VLFamily(), Qwen3VLFamily(), InternVLFamily(), Gemma3Family(),
                PaliGemmaFamily(), Idefics3Family(), SmolVLMFamily(), MllamaFamily()):
    register(_family)


def supported_families() -> str:
    """One line per family: model type, description and example checkpoints."""
    families = dict.fromkeys(FAMILIES.values())
    return "; ".join(
        f"{', '.join(f.model_types)}: {f.description}, e.g. {', '.join(f.checkpoints)}"
        for f in families
    )


def from_hf_config(hf_config: Any) -> MultimodalConfig:
    """Read a Hugging Face config through the family adapter registered for its model_type.

    Raises for a model type no family accepts, listing the supported families.
    """
    return family_for(getattr(hf_config, "model_type", None)).read_config(hf_config)


def family_for(model_type: str | None) -> Family:
    """The adapter for a Hugging Face ``model_type``; raises listing the supported families,
    or when the installed ``transformers`` is older than the family's ``min_transformers``."""
    family = FAMILIES.get(model_type)  # type: ignore[arg-type]
    if family is None:
        raise ValueError(f"checkpoint of model_type {model_type!r} is not a supported model "
                         f"family: mmlens supports {supported_families()}")
    check_transformers(family)
    return family


def check_transformers(family: Family) -> None:
    """Refuse a family on a ``transformers`` older than the one its parity is verified on."""
    import transformers
    from packaging.version import Version

    needed = family.min_transformers
    if needed is not None and Version(transformers.__version__) < Version(needed):
        raise ImportError(
            f"{family.name} needs transformers>={needed} (found {transformers.__version__}): "
            "mmlens's parity with Hugging Face is verified from that version on for this "
            f"family; pip install -U 'transformers>={needed}'")


__all__ = ["FAMILIES", "Family", "Gemma3Family", "Idefics3Family", "InternVLFamily",
           "LlavaFamily", "LlavaNextFamily", "LlavaOnevisionFamily", "PaliGemmaFamily",
           "Qwen25VLFamily", "Qwen3VLFamily", "QwenVLFamily", "SmolVLMFamily", "family_for",
           "from_hf_config", "register", "supported_families"]
