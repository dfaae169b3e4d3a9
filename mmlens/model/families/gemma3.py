"""Gemma 3: a SigLIP vision tower, an average-pooling projector and a Gemma 3 decoder.

The decoder interleaves sliding-window and global layers, each kind with its own rotary base;
q/k RMSNorms, norms before and after attention and MLP (``x * (1 + w)``), embeddings scaled by
``sqrt(d_model)``, scores scaled by ``query_pre_attn_scalar ** -0.5``, a gated tanh-GELU MLP.
The tokens of one image attend to each other both ways (Hugging Face's ``token_type_ids``
blocks); the mask rule (``attention_masks``) builds each layer's mask, sliding layers cut to
their window, and a knockout only ANDs its blocked edges into it.

The HF module tree read here (``Gemma3ForConditionalGeneration``, transformers >= 5)::

    model.vision_tower.vision_model                       (SiglipVisionModel)
        .embeddings.{patch_embedding, position_embedding}, .encoder.layers.{i}, .post_layernorm
    model.multi_modal_projector.{mm_input_projection_weight, mm_soft_emb_norm}
    model.language_model.{embed_tokens, norm}
        .layers.{i}.{self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm, mlp.{gate,up,down}_proj,
                     input_layernorm, post_attention_layernorm,
                     pre_feedforward_layernorm, post_feedforward_layernorm}
    lm_head                                               (tied to embed_tokens)

HF's ``Gemma3ForConditionalGeneration`` applies neither attention nor final logit
soft-capping (its attention never passes ``attn_logit_softcapping``); neither does this port.
Pan-and-scan crops from HF's processor run as they are (each crop is its own image block);
``prepare``'s composed processor refuses pan-and-scan (the processor's default is off).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

from mmlens.core.errors import MMLensError
from mmlens.inputs.layouts.pooled import PooledGridLayout
from mmlens.inputs.processor import ComposedProcessor
from mmlens.model.components.gemma import GemmaRMSNorm, PooledProjector, ScaledEmbed
from mmlens.model.config import LanguageConfig, MultimodalConfig
from mmlens.model.families.gemma_text import (
    LayerTypeRotary,
    convert_gemma_language,
    gemma_blocks,
    gemma_masks,
    gemma_text_config,
    image_blocks,
)
from mmlens.model.families.llava import LlavaFamily, clip_vision_config
from mmlens.model.families.onevision import convert_siglip_vision
from mmlens.model.kv_cache import KeyValueCache
from mmlens.model.loading.convert import find_prefix, take
from mmlens.model.siglip import SiglipPostNormTower


def gemma3_text(tc: Any) -> Any:
    if tc.model_type != "gemma3_text":
        raise MMLensError(f"text model {tc.model_type!r} is not supported for Gemma 3: mmlens "
                          "supports gemma3_text")
    return gemma_text_config(tc)


def gemma3_processor(tokenizer: Any, image_processor: Any, hf_config: Any,
                     chat_template: str | None = None) -> ComposedProcessor:
    """Gemma 3's processor from its parts: each ``<image_soft_token>`` of a prompt becomes
    ``mm_tokens_per_image`` of them, and ``token_type_ids`` are 1 at image tokens, as HF's."""
    n_tokens = hf_config.mm_tokens_per_image
    return ComposedProcessor(
        tokenizer, image_processor, count_image_tokens=lambda _: n_tokens,
        chat_template=chat_template, sizes_key=None, token_type_ids="image", drop=("num_crops",),
        image_token=tokenizer.convert_ids_to_tokens(hf_config.image_token_id))



def siglip_config(vc: Any) -> Any:
    """The SigLIP tower's config (no class token; every layer runs): Gemma 3's and PaliGemma's."""
    return dataclasses.replace(clip_vision_config(vc, [vc.num_hidden_layers]),
                               has_class_token=False)


def convert_siglip_post_norm(state: dict[str, Tensor], cfg: MultimodalConfig
                             ) -> dict[str, Tensor]:
    """SigLIP's weights with its final ``post_layernorm`` (``vision.ln_post``)."""
    vision = convert_siglip_vision(state, cfg)
    v = find_prefix(state, "model.vision_tower.vision_model.", "model.vision_tower.")
    vision["vision.ln_post.w"] = take(state, v + "post_layernorm.weight")
    vision["vision.ln_post.b"] = take(state, v + "post_layernorm.bias")
    return vision

class Gemma3Family(LlavaFamily):
    name = "gemma3"
    model_types = ("gemma3",)
    hf_class = "Gemma3ForConditionalGeneration"
    description = ("Gemma 3 (SigLIP vision tower, average-pooling projector, Gemma 3 decoder "
                   "with sliding-window and global layers, bidirectional image blocks)")
    checkpoints = ("google/gemma-3-4b-it", "google/gemma-3-12b-it")
    prompt_template = "gemma3"
    processor_keys = ("token_type_ids",)

    def read_config(self, hf_config: Any) -> MultimodalConfig:
        vc = hf_config.vision_config
        if vc.model_type != "siglip_vision_model":
            raise MMLensError(f"vision tower {vc.model_type!r} is not supported for Gemma 3: "
                              "mmlens supports siglip_vision_model")
        vision = siglip_config(vc)
        return MultimodalConfig(
            model_type="gemma3", vision=vision, text=gemma3_text(hf_config.text_config),
            image_token_id=hf_config.image_token_id, feature_layers=[vc.num_hidden_layers],
            feature_select_strategy="full", projector_act="none", projector_bias=False,
            hf_config=hf_config)

    def convert_state_dict(self, state: dict[str, Tensor],
                           cfg: MultimodalConfig) -> dict[str, Tensor]:
        vision = convert_siglip_post_norm(state, cfg)
        p = find_prefix(state, "model.multi_modal_projector.")
        projector = {"projector.W": take(state, p + "mm_input_projection_weight"),
                     "projector.norm.w": take(state, p + "mm_soft_emb_norm.weight")}
        return {**vision, **projector, **convert_gemma_language(state, cfg)}

    def build_image_modules(self, cfg: MultimodalConfig) -> dict[str, nn.Module]:
        vc = cfg.vision
        return {"vision": SiglipPostNormTower(cfg),
                "projector": PooledProjector(vc.d_model, cfg.text.d_model, vc.grid_size,
                                             cfg.hf_config.mm_tokens_per_image, vc.eps)}

    def build_embed(self, cfg: LanguageConfig) -> nn.Module:
        return ScaledEmbed(cfg.d_vocab, cfg.d_model)

    def build_blocks(self, cfg: LanguageConfig) -> nn.ModuleList:
        return gemma_blocks(cfg)  # type: ignore[arg-type]

    def build_final_norm(self, cfg: LanguageConfig) -> nn.Module:
        return GemmaRMSNorm(cfg.d_model, cfg.eps)

    def rotary(self, cfg: LanguageConfig) -> Any:
        return LayerTypeRotary(cfg.rope_by_type)  # type: ignore[attr-defined]

    def token_type_ids(self, cfg: MultimodalConfig, input_ids: Tensor) -> Tensor:
        return (input_ids == cfg.image_token_id).long()

    def exact_suffix_start(self, token_type_ids: Tensor | None, position: int) -> int:
        """The start of the image block ``position`` falls in (its tokens see each other)."""
        if token_type_ids is None:
            raise MMLensError("Gemma 3's suffix runs need the prompt's token_type_ids")
        kinds = token_type_ids[0].tolist()
        while 0 < position < len(kinds) and kinds[position] == 1 and kinds[position - 1] == 1:
            position -= 1
        return position

    def attention_masks(
        self, cfg: MultimodalConfig, *, attention_mask: Tensor, q_len: int,
        input_ids: Tensor | None, token_type_ids: Tensor | None = None,
        past_kv_cache: KeyValueCache | None = None,
    ) -> list[Tensor | None]:
        """Causal, each image's tokens bidirectional among themselves, sliding layers cut to
        their window. Resuming from a residual stream needs ``token_type_ids`` (of the new
        positions, or of the whole sequence); a cached run's new positions are taken as text
        without them. The image blocks among a cached run's new positions must start there
        (``exact_suffix_start``): the cache cannot see them."""
        past = attention_mask.shape[1] - q_len
        if input_ids is not None:
            is_image = input_ids == cfg.image_token_id
        elif token_type_ids is not None:
            is_image = token_type_ids[:, -q_len:] == 1
        elif past == 0:
            raise MMLensError(
                "Gemma 3 attends both ways within each image, so a run resuming from a residual "
                "stream needs to know where the images are: pass token_type_ids= (1 at image "
                "tokens, as the processor gives them; e.g. input_ids == cfg.image_token_id)")
        else:
            is_image = None  # a cached run's new positions: text after the images
        bidirectional = None
        if is_image is not None and bool(is_image.any()):
            blocks = image_blocks(is_image)
            same = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
            bidirectional = torch.nn.functional.pad(same, (past, 0), value=False)
        return gemma_masks(cfg.text, attention_mask, q_len, bidirectional)  # type: ignore[arg-type]

    def load_processor(self, path: str, **kwargs: Any) -> Any:
        """Composed from the checkpoint's tokenizer and PIL image processor (no torchvision):
        each ``<image_soft_token>`` of a prompt becomes ``mm_tokens_per_image`` of them, so
        a template writes the image as Gemma's processor expands it."""
        from transformers import AutoConfig, AutoTokenizer
        from transformers.models.gemma3.image_processing_pil_gemma3 import (
            Gemma3ImageProcessorPil,
        )

        from mmlens.inputs.processor import read_chat_template

        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            image_processor = Gemma3ImageProcessorPil.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise MMLensError(f"{path} has no usable tokenizer or image processor ({error}); a "
                              "Gemma 3 checkpoint needs its tokenizer files and "
                              "preprocessor_config.json") from error
        if getattr(image_processor, "do_pan_and_scan", False):
            raise MMLensError("the image processor has do_pan_and_scan=True: pan-and-scan crops "
                              "are not supported, set it to false in preprocessor_config.json")
        return gemma3_processor(tokenizer, image_processor, AutoConfig.from_pretrained(path),
                                read_chat_template(path, tokenizer))

    def image_layout(self, model: Any) -> PooledGridLayout:
        """SigLIP's square, no class token; each image token averages a ``kernel x kernel``
        block of patches (``mm_tokens_per_image`` tokens an image)."""
        vision = model.cfg.vision
        side = math.isqrt(model.cfg.hf_config.mm_tokens_per_image)
        return PooledGridLayout(vision.image_size, vision.patch_size,
                                kernel=vision.grid_size // side)
