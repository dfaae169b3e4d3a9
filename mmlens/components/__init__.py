"""Small hooked building blocks; one concern per module."""

from mmlens.components.attention import Attention
from mmlens.components.blocks import LanguageBlock, VisionBlock
from mmlens.components.embed import Embed, Unembed, VisionEmbed
from mmlens.components.mlp import GatedMLP, VisionMLP
from mmlens.components.norms import LayerNorm, RMSNorm
from mmlens.components.projector import Projector
from mmlens.components.rotary import RotaryEmbedding

__all__ = [
    "Attention",
    "Embed",
    "GatedMLP",
    "LanguageBlock",
    "LayerNorm",
    "Projector",
    "RMSNorm",
    "RotaryEmbedding",
    "Unembed",
    "VisionBlock",
    "VisionEmbed",
    "VisionMLP",
]
