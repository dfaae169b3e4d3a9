"""mmlens: hooked multimodal transformers (LLaVA) for interpretability."""

from mmlens.inputs.batch import MultimodalBatch
from mmlens.inputs.templates import LLAMA3, VICUNA_V1, PromptTemplate
from mmlens.model.hooked import HookedMultimodalTransformer
from mmlens.model.kv_cache import KeyValueCache

__all__ = [
    "LLAMA3",
    "VICUNA_V1",
    "HookedMultimodalTransformer",
    "KeyValueCache",
    "MultimodalBatch",
    "PromptTemplate",
]
