"""LLaVA-OneVision: a SigLIP vision tower, LLaVA's MLP projector and a Qwen2 decoder on
anyres-max tiles.

Tiling, unpadding and ``image_newline`` are LLaVA-NeXT's; in addition the kept feature grid of
each image is downscaled (bilinear) when it holds more than ``anyres_max_<n>`` tiles' worth of
features (``mmlens.model.anyres``, ``mmlens.inputs.tiling``). SigLIP has no class token, so
the tiles' features are selected with strategy ``"full"``.

The HF module tree read here (``LlavaOnevisionForConditionalGeneration``, transformers >= 5)::

    model.vision_tower                                    (SiglipVisionModel)
        .embeddings.{patch_embedding.{weight, bias}, position_embedding}
        .encoder.layers.{i}.{self_attn.{q,k,v,out}_proj, layer_norm{1,2}, mlp.fc{1,2}}
        .post_layernorm                                   (unused: features are read before it)
    model.multi_modal_projector.linear_{1,2}
    model.image_newline
    model.language_model                                  (Qwen2Model: q/k/v biases, GQA)
    lm_head

The projector and decoder share LLaVA's rename tables (``loading.convert``). Processors: HF's
``LlavaOnevisionProcessor`` needs a video processor and so torchvision; the family composes the
tokenizer, the PIL image processor and the chat template itself (``inputs.processor``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from torch import Tensor, nn

from mmlens.core.sizes import ImageSize
from mmlens.inputs.processor import ComposedProcessor, read_chat_template
from mmlens.inputs.tiling import AnyresGeometry
from mmlens.model.anyres import AnyresPacker
from mmlens.model.components import Projector
from mmlens.model.config import (
    MultimodalConfig,
    language_config_from_hf,
    resolve_feature_layers,
)
from mmlens.model.families.llava import clip_vision_config
from mmlens.model.families.llava_next import LlavaNextFamily
from mmlens.model.loading.convert import (
    VISION_BLOCK,
    convert_language,
    convert_projector,
    find_prefix,
    take,
)
from mmlens.model.siglip import SiglipVisionTower


def anyres_max_tiles(vision_aspect_ratio: str) -> int:
    """``"anyres_max_9"`` -> 9: the most tiles' worth of unpadded features an image keeps."""
    match = re.fullmatch(r"anyres_max_(\d+)", str(vision_aspect_ratio))
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"vision_aspect_ratio {vision_aspect_ratio!r} is not supported: "
                         "LLaVA-OneVision uses 'anyres_max_<n>' with n >= 1, e.g. 'anyres_max_9'")
    return int(match.group(1))


def onevision_config(hf_config: Any) -> MultimodalConfig:
    """Read a Hugging Face ``LlavaOnevisionConfig`` into a ``MultimodalConfig``."""
    vc, tc = hf_config.vision_config, hf_config.text_config
    if vc.model_type != "siglip_vision_model":
        raise ValueError(f"vision tower {vc.model_type!r} is not supported for LLaVA-OneVision: "
                         "mmlens supports siglip_vision_model")
    if tc.model_type != "qwen2":
        raise ValueError(f"text model {tc.model_type!r} is not supported for LLaVA-OneVision: "
                         "mmlens supports qwen2")
    strategy = hf_config.vision_feature_select_strategy
    if strategy != "full":
        raise ValueError(
            f"vision_feature_select_strategy {strategy!r} drops a SigLIP patch feature (SigLIP "
            "has no class token), which breaks the tile grid; Hugging Face's model cannot run it "
            "either: use 'full'")
    feature_layers = resolve_feature_layers(hf_config.vision_feature_layer, vc.num_hidden_layers)
    # SigLIP reads like CLIP's config, less the class token.
    vision = dataclasses.replace(clip_vision_config(vc, feature_layers), has_class_token=False)
    return MultimodalConfig(
        model_type="llava_onevision",
        vision=vision,
        text=language_config_from_hf(tc),
        image_token_id=hf_config.image_token_id,
        feature_layers=feature_layers,
        feature_select_strategy=strategy,
        projector_act=hf_config.projector_hidden_act,
        projector_bias=bool(getattr(hf_config, "multimodal_projector_bias", True)),
        image_grid_pinpoints=hf_config.image_grid_pinpoints,
        anyres_max_tiles=anyres_max_tiles(hf_config.vision_aspect_ratio),
        hf_config=hf_config,
    )


def convert_siglip_vision(state: dict[str, Tensor], cfg: MultimodalConfig) -> dict[str, Tensor]:
    """SigLIP tower; blocks after the last selected feature layer and the post-norm are dropped."""
    p = find_prefix(state, "model.vision_tower.vision_model.", "model.vision_tower.")
    out = {
        "vision.embed.W_patch": take(state, p + "embeddings.patch_embedding.weight"),
        "vision.embed.b_patch": take(state, p + "embeddings.patch_embedding.bias"),
        "vision.embed.W_pos": take(state, p + "embeddings.position_embedding.weight"),
    }
    for layer in range(cfg.vision.n_layers):
        for ours, theirs in VISION_BLOCK.items():
            out[f"vision.blocks.{layer}.{ours}"] = take(
                state, f"{p}encoder.layers.{layer}.{theirs}")
    return out


def convert_onevision_state_dict(
    state: dict[str, Tensor], cfg: MultimodalConfig
) -> dict[str, Tensor]:
    """Whole-model conversion for LLaVA-OneVision checkpoints."""
    return {**convert_siglip_vision(state, cfg), **convert_projector(state, cfg),
            "anyres.image_newline": take(state, "model.image_newline"),
            **convert_language(state, cfg)}


def onevision_processor(tokenizer: Any, image_processor: Any, cfg: MultimodalConfig,
                        chat_template: str | None = None) -> ComposedProcessor:
    """The image + text processor of a OneVision checkpoint, checked against the model."""
    geometry = AnyresGeometry.from_config(cfg)
    size = dict(getattr(image_processor, "size", None) or {})
    tile = size.get("height", size.get("shortest_edge"))
    if tile != geometry.tile_size or size.get("width", tile) != geometry.tile_size:
        raise ValueError(f"the image processor resizes tiles to {size} but the vision tower takes "
                         f"{geometry.tile_size}x{geometry.tile_size}: is preprocessor_config.json "
                         "from this checkpoint?")
    pinpoints = [list(p) for p in getattr(image_processor, "image_grid_pinpoints", None) or []]
    if pinpoints != [list(p) for p in geometry.grid_pinpoints]:
        raise ValueError("the image processor's image_grid_pinpoints differ from the model "
                         "config's: is preprocessor_config.json from this checkpoint?")

    def count_image_tokens(height_width: tuple[int, int]) -> int:
        # the composed processor hands over rows of Hugging Face's image_sizes: (height, width)
        return geometry.n_image_tokens(ImageSize.from_hw(*height_width))

    return ComposedProcessor(tokenizer, image_processor, chat_template=chat_template,
                             count_image_tokens=count_image_tokens)


def load_onevision_processor(name_or_path: str, cfg: MultimodalConfig) -> ComposedProcessor:
    """Tokenizer (``AutoTokenizer``), the PIL image processor and the chat template of a
    checkpoint; no video processor (and so no torchvision) needed."""
    from transformers import AutoTokenizer
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{name_or_path} has no usable tokenizer or image processor ({error}); a LLaVA-"
            "OneVision checkpoint needs its tokenizer files and preprocessor_config.json"
        ) from error
    return onevision_processor(tokenizer, image_processor, cfg,
                               read_chat_template(name_or_path, tokenizer))


class LlavaOnevisionFamily(LlavaNextFamily):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    hf_class = "LlavaOnevisionForConditionalGeneration"
    description = ("LLaVA-OneVision (SigLIP vision tower, MLP projector, Qwen2 decoder, "
                   "anyres-max tiles)")
    checkpoints = ("llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
                   "llava-hf/llava-onevision-qwen2-7b-ov-hf")
    pixel_rule = False

    def read_config(self, hf_config: Any) -> MultimodalConfig:
        return onevision_config(hf_config)

    def convert_state_dict(self, state: dict[str, Tensor],
                           cfg: MultimodalConfig) -> dict[str, Tensor]:
        return convert_onevision_state_dict(state, cfg)

    def build_image_modules(self, cfg: MultimodalConfig) -> dict[str, nn.Module]:
        return {
            "vision": SiglipVisionTower(cfg),
            "projector": Projector(cfg.vision.d_model * len(cfg.feature_layers),
                                   cfg.text.d_model, cfg.projector_act, cfg.projector_bias),
            "anyres": AnyresPacker(cfg),
        }

    def load_processor(self, path: str, **kwargs: Any) -> ComposedProcessor:
        """Composed from the checkpoint's parts (HF's processor needs torchvision), checked
        against the checkpoint's model config."""
        from transformers import AutoConfig

        return load_onevision_processor(path, self.read_config(AutoConfig.from_pretrained(path)))
