"""A tiny PaliGemma 2 (``PaliGemmaForConditionalGeneration`` on a Gemma 2 decoder): SigLIP
32 px / 8 px patches = 16 image tokens, 4 decoder layers alternating sliding (window 4) and
global, attention and final soft-caps, grouped-query attention, a word-level tokenizer.
``hf_config(text_config={"model_type": "gemma"})`` gives PaliGemma 1's Gemma decoder."""

from __future__ import annotations

from typing import Any

from mmlens.core.sizes import ImageSize
from mmlens.zoo.tiny.tokenizer import word_tokenizer

HF_CLASS = "PaliGemmaForConditionalGeneration"
VARIANTS = {"gemma_decoder": {"text_config": {"model_type": "gemma"}}}
"""PaliGemma 1: a Gemma decoder (no window, no soft-caps)."""
IMAGE_SIZES = (ImageSize(37, 29), ImageSize(20, 45), ImageSize(64, 64))

SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<image>")
VOCAB = 80


def hf_config(**overrides: Any) -> Any:
    """The tiny ``PaliGemmaConfig``; ``text_config`` / ``vision_config`` dicts update the
    towers' fields (``text_config={"model_type": "gemma"}``: a Gemma 1 decoder)."""
    from transformers import PaliGemmaConfig

    text = dict(model_type="gemma2", vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                max_position_embeddings=256, rms_norm_eps=1e-6,
                pad_token_id=0, eos_token_id=1, bos_token_id=2)
    text.update(overrides.pop("text_config", {}))
    if text["model_type"] == "gemma2":
        text = dict(query_pre_attn_scalar=12, sliding_window=4, attn_logit_softcapping=5.0,
                    final_logit_softcapping=3.0,
                    layer_types=["sliding_attention", "full_attention"] * 2, **text)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, image_size=32, patch_size=8, vision_use_head=False)
    vision.update(overrides.pop("vision_config", {}))
    fields = dict(text_config=text, vision_config=vision, projection_dim=32, hidden_size=32,
                  image_token_index=SPECIALS.index("<image>"), vocab_size=VOCAB,
                  pad_token_id=0, eos_token_id=1, bos_token_id=2)
    fields.update(overrides)
    return PaliGemmaConfig(**fields)


def tokenizer() -> Any:
    """Word-level, no BOS added by the tokenizer (PaliGemma's prompt puts it after the
    image), left padding."""
    return word_tokenizer(SPECIALS, ["answer en caption the a is of and"], vocab=VOCAB,
                          unk="<unk>", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                          extra_special_tokens={"image_token": "<image>"})


def image_processor(hf_config: Any) -> Any:
    """The PIL SigLIP image processor (no torchvision) at the tower's size."""
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    size = hf_config.vision_config.image_size
    image_processor = SiglipImageProcessorPil(size={"height": size, "width": size})
    image_processor.image_seq_length = hf_config.text_config.num_image_tokens
    return image_processor


def processor(hf_config: Any) -> Any:
    """The processor ``from_pretrained`` composes for PaliGemma (``families.paligemma``):
    prompts in ``templates.PALIGEMMA``'s form, the whole prompt the prefix."""
    from mmlens.model.families.paligemma import paligemma_processor

    return paligemma_processor(tokenizer(), image_processor(hf_config), hf_config)


def hf_processor(hf_config: Any) -> Any:
    """HF's own ``PaliGemmaProcessor`` (it writes the prompt form; answers as ``suffix=``)."""
    from transformers import PaliGemmaProcessor

    return PaliGemmaProcessor(image_processor=image_processor(hf_config), tokenizer=tokenizer())
