"""The hooked network: vision tower, connector, image merge, decoder, loading from Hugging Face."""

from mmlens.model.hooked import HookedMultimodalTransformer
from mmlens.model.kv_cache import KeyValueCache

__all__ = ["HookedMultimodalTransformer", "KeyValueCache"]
