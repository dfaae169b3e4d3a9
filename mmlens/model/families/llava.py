"""LLaVA-1.5: a CLIP vision tower, a two-layer MLP projector and a Llama decoder.

Each image is one square crop; its patch features replace the prompt's image tokens in order.
"""

from __future__ import annotations

from typing import Any

from jaxtyping import Float
from torch import Tensor, nn

from mmlens.inputs.layouts.grid import GridLayout
from mmlens.model.components import Projector
from mmlens.model.config import (
    MultimodalConfig,
    VisionConfig,
    language_config,
    resolve_feature_layers,
)
from mmlens.model.families.base import Family
from mmlens.model.loading.convert import convert_llava_state_dict
from mmlens.model.vision import VisionTower


def clip_vision_config(vc: Any, feature_layers: list[int]) -> VisionConfig:
    """A CLIP vision config; only the blocks up to the last selected feature layer are kept."""
    return VisionConfig(
        d_model=vc.hidden_size,
        n_heads=vc.num_attention_heads,
        d_mlp=vc.intermediate_size,
        n_layers=max(feature_layers),
        image_size=vc.image_size,
        patch_size=vc.patch_size,
        n_channels=vc.num_channels,
        eps=vc.layer_norm_eps,
        act_fn=vc.hidden_act,
    )


class LlavaFamily(Family):
    name = "llava"
    model_types = ("llava",)
    hf_class = "LlavaForConditionalGeneration"
    description = "LLaVA-1.5 (CLIP vision tower, MLP projector, Llama decoder)"
    checkpoints = ("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-13b-hf",
                   "shapes-llava (bundled)")
    pixel_rule = True

    def read_config(self, hf_config: Any) -> MultimodalConfig:
        vc, tc = hf_config.vision_config, hf_config.text_config
        if vc.model_type != "clip_vision_model":
            raise ValueError(f"vision tower {vc.model_type!r} is not supported: mmlens supports "
                             f"clip_vision_model for {self.name}")
        if tc.model_type != "llama":
            raise ValueError(f"text model {tc.model_type!r} is not supported: mmlens supports "
                             "llama (Vicuna and Llama-3 text towers)")
        strategy = hf_config.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {strategy!r} is not supported: "
                             "use 'default' or 'full'")
        feature_layers = resolve_feature_layers(hf_config.vision_feature_layer,
                                                vc.num_hidden_layers)
        return MultimodalConfig(
            model_type=hf_config.model_type,
            vision=clip_vision_config(vc, feature_layers),
            text=language_config(tc),
            image_token_id=hf_config.image_token_id,
            feature_layers=feature_layers,
            feature_select_strategy=strategy,
            projector_act=hf_config.projector_hidden_act,
            projector_bias=bool(getattr(hf_config, "multimodal_projector_bias", True)),
            image_grid_pinpoints=getattr(hf_config, "image_grid_pinpoints", None),
            hf_config=hf_config,
        )

    def convert_state_dict(self, state: dict[str, Tensor],
                           cfg: MultimodalConfig) -> dict[str, Tensor]:
        return convert_llava_state_dict(state, cfg)

    def build_image_modules(self, cfg: MultimodalConfig) -> dict[str, nn.Module]:
        return {
            "vision": VisionTower(cfg),
            "projector": Projector(cfg.vision.d_model * len(cfg.feature_layers),
                                   cfg.text.d_model, cfg.projector_act, cfg.projector_bias),
        }

    def encode_images(
        self, model: Any, pixel_values: Tensor, image_sizes: Tensor | None
    ) -> Float[Tensor, "n_image_tokens d_model"]:
        """``pixel_values [images, 3, H, W]`` -> every image's patch features, in order."""
        features = model.projector(model.vision(pixel_values.to(model.embed.W_E.dtype)))
        return features.reshape(-1, features.shape[-1])

    def preprocessing_mode(self, model: Any, mode: str | None) -> str:
        """``mode`` where the processor agrees (``"pad"`` always does); by default ``"pad"`` for
        a checkpoint trained on padded images (LLaVA-1.5), else the processor's own geometry."""
        from mmlens.inputs.checkpoints import default_preprocessing
        from mmlens.inputs.preprocessing import check_preprocessing

        if mode is None and default_preprocessing(model) == "pad":
            mode = "pad"
        return check_preprocessing(model.processor, mode, model.cfg.vision.image_size)

    def image_layout(self, model: Any) -> GridLayout:
        """A square crop; the tower's rows start with CLIP's class token, whose feature comes
        first where the features keep it (strategy ``"full"``)."""
        vision = model.cfg.vision
        return GridLayout(vision.image_size, vision.patch_size,
                          class_token=vision.has_class_token,
                          class_feature=vision.has_class_token
                          and model.cfg.feature_select_strategy == "full")
