"""Small hooked building blocks; one concern per module."""

from mmlens.model.components.attention import Attention
from mmlens.model.components.blocks import LanguageBlock, VisionBlock
from mmlens.model.components.embed import Embed, SiglipVisionEmbed, Unembed, VisionEmbed
from mmlens.model.components.mlp import GatedMLP, VisionMLP
from mmlens.model.components.norms import LayerNorm, RMSNorm
from mmlens.model.components.projector import Projector
from mmlens.model.components.rotary import RotaryEmbedding

__all__ = [
    "Attention",
    "Embed",
    "GatedMLP",
    "LanguageBlock",
    "LayerNorm",
    "Projector",
    "RMSNorm",
    "RotaryEmbedding",
    "SiglipVisionEmbed",
    "Unembed",
    "VisionBlock",
    "VisionEmbed",
    "VisionMLP",
]
