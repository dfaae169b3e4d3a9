"""Images and questions -> ``MultimodalBatch``: prompt templates, tokenisation, spans, geometry."""

from mmlens.core.images import to_rgb
from mmlens.inputs.batch import MultimodalBatch
from mmlens.inputs.prepare import prepare, prepare_examples
from mmlens.inputs.templates import LLAMA3, VICUNA_V1, PromptTemplate
from mmlens.inputs.token_map import ImageLayout, ImageTokenMap, TokenPlace

__all__ = [
    "LLAMA3", "VICUNA_V1", "ImageLayout", "ImageTokenMap", "MultimodalBatch", "PromptTemplate",
    "TokenPlace", "prepare", "prepare_examples", "to_rgb",
]
