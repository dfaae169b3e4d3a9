"""Loading Hugging Face LLaVA checkpoints into a HookedMultimodalTransformer."""

from mmlens.model.loading.convert import convert_llava_state_dict
from mmlens.model.loading.pretrained import convert_hf_model, load_pretrained

__all__ = ["convert_hf_model", "convert_llava_state_dict", "load_pretrained"]
