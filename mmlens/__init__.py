"""mmlens: hooked multimodal transformers (LLaVA) for interpretability."""

from mmlens.batch import MultimodalBatch
from mmlens.kv_cache import KeyValueCache
from mmlens.model import HookedMultimodalTransformer
from mmlens.templates import LLAMA3, VICUNA_V1, PromptTemplate

__all__ = [
    "LLAMA3",
    "VICUNA_V1",
    "HookedMultimodalTransformer",
    "KeyValueCache",
    "MultimodalBatch",
    "PromptTemplate",
]
