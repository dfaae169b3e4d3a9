"""Images and questions -> ``MultimodalBatch``: prompt templates, tokenisation, spans, geometry."""

from mmlens.core.images import to_rgb
from mmlens.inputs.batch import MultimodalBatch
from mmlens.inputs.prepare import prepare, prepare_examples
from mmlens.inputs.templates import LLAMA3, VICUNA_V1, PromptTemplate

__all__ = [
    "LLAMA3", "VICUNA_V1", "MultimodalBatch", "PromptTemplate", "prepare", "prepare_examples",
    "to_rgb",
]
