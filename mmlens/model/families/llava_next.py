"""LLaVA-NeXT (LLaVA-1.6): LLaVA-1.5's tower, projector and decoder on anyres tiles.

Each image is a base tile plus high-resolution tiles; the ``anyres`` packer lays the tiles'
features out on the image's grid, crops the padding and ends every row with the learned
``image_newline`` (``mmlens.model.anyres``). The merge is LLaVA-1.5's: the packed features
replace the image tokens in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jaxtyping import Float
from torch import Tensor, nn

from mmlens.inputs.layouts.anyres import AnyresLayout
from mmlens.inputs.tiling import AnyresGeometry
from mmlens.model.anyres import AnyresPacker
from mmlens.model.config import MultimodalConfig
from mmlens.model.families.base import Family
from mmlens.model.families.llava import LlavaFamily
from mmlens.model.loading.convert import take


class LlavaNextFamily(LlavaFamily):
    name = "llava_next"
    fixed_preprocessing = "anyres"
    model_types = ("llava_next",)
    hf_class = "LlavaNextForConditionalGeneration"
    description = "LLaVA-NeXT (LLaVA-1.5 on anyres tiles with image_newline)"
    checkpoints = ("llava-hf/llava-v1.6-vicuna-7b-hf", "llava-hf/llama3-llava-next-8b-hf")

    def convert_state_dict(self, state: dict[str, Tensor],
                           cfg: MultimodalConfig) -> dict[str, Tensor]:
        out = super().convert_state_dict(state, cfg)
        newline = take(state, "model.image_newline", optional=True)
        out["anyres.image_newline"] = newline if newline is not None else take(
            state, "image_newline")
        return out

    def build_image_modules(self, cfg: MultimodalConfig) -> dict[str, nn.Module]:
        return {**super().build_image_modules(cfg), "anyres": AnyresPacker(cfg)}

    def encode_images(
        self, model: Any, pixel_values: Tensor, image_sizes: Tensor | None
    ) -> Float[Tensor, "n_image_tokens d_model"]:
        """``pixel_values [images, tiles, 3, H, W]`` and ``image_sizes [images, 2]`` (height,
        width) -> the packed image tokens of every image, in order."""
        tiles = model.anyres.select_tiles(pixel_values, image_sizes)
        features = model.projector(model.vision(tiles.to(model.embed.W_E.dtype)))
        return model.anyres(features, image_sizes)

    def stack_pixel_values(self, pixel_values: Sequence[Tensor]) -> Tensor:
        from mmlens.inputs.tiling import pad_tiles

        return pad_tiles(list(pixel_values))

    def add_image_spans(self, model: Any, batch: Any) -> None:
        from mmlens.inputs.anyres_spans import add_anyres_spans

        add_anyres_spans(model, batch)

    def preprocessing_mode(self, model: Any, mode: str | None) -> str:
        """Any known mode: the tiling is the model's, and its ``image_layout`` follows it."""
        return Family.preprocessing_mode(self, model, mode)

    def image_layout(self, model: Any) -> AnyresLayout:
        """Anyres tiles (and OneVision's anyres-max downscale); each tower row starts with a
        class token where the tower has one (CLIP: yes; SigLIP: no)."""
        return AnyresLayout(AnyresGeometry.from_config(model.cfg),
                            class_token=model.cfg.vision.has_class_token)
