"""Qwen2-VL and Qwen2.5-VL: the Qwen vision transformer, the patch merger and a Qwen2 decoder
with multimodal rotary positions (M-RoPE).

Images come at their own resolution (``smart_resize`` to a multiple of 28 px), as flattened
14 px patches ``pixel_values [n_patches, 3*2*14*14]`` with ``image_grid_thw [images, 3]``
(passed where LLaVA-NeXT passes ``image_sizes``). The merger turns every 2x2 patches into one
image token; the tokens replace the prompt's ``<|image_pad|>`` tokens in order. Decoder
positions are 3D (``mmlens.model.components.mrope``)::

    pixel_values ─▶ vision.hook_embed ─▶ vision.blocks.{l}.* ─▶ merger.hook_in ─▶ merger.hook_out
    input_ids ─▶ hook_token_embed ──┴─ merge at <|image_pad|> ─▶ hook_embed ─▶ blocks.{l}.*
    input_ids + image_grid_thw ─▶ (t, h, w) position ids ─▶ M-RoPE tables of every block

``prepare`` pads each example's patches to ``[images, max_patches, dim]`` so a batch can be
indexed by example; ``encode_images`` takes that layout or HF's packed one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mmlens.inputs.layouts.merged import MergedLayout
from mmlens.model.components.mrope import MRotaryEmbedding, mrope_position_ids
from mmlens.model.components.qwen_vision import PatchMerger, QwenVisionTower
from mmlens.model.config import (
    LanguageConfig,
    MultimodalConfig,
    QwenVisionConfig,
    language_config,
)
from mmlens.model.families.base import Family
from mmlens.model.kv_cache import KeyValueCache
from mmlens.model.loading.convert import convert_language
from mmlens.model.loading.convert_qwen import (
    convert_qwen_vision,
    qwen2_vision_config,
    qwen25_vision_config,
)


class QwenVLFamily(Family):
    name = "qwen2_vl"
    fixed_preprocessing = "dynamic"
    model_types = ("qwen2_vl",)
    hf_class = "Qwen2VLForConditionalGeneration"
    description = ("Qwen2-VL (Qwen vision transformer with 2D rotary, 2x2 patch merger, Qwen2 "
                   "decoder with M-RoPE)")
    checkpoints = ("Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-7B-Instruct")
    image_sizes_key = "image_grid_thw"

    def read_config(self, hf_config: Any) -> MultimodalConfig:
        tc = hf_config.text_config
        if getattr(tc, "use_sliding_window", False):
            raise ValueError(f"{self.name}: sliding-window attention in the decoder is not "
                             "supported (use_sliding_window is set in the text config)")
        return self._config(hf_config, self.read_vision_config(hf_config.vision_config),
                            qkv_bias=True,
                            o_bias=False)

    def _config(self, hf_config: Any, vision: QwenVisionConfig,
                **text: Any) -> MultimodalConfig:
        """The config of a Qwen-VL family: ``vision`` and the M-RoPE decoder (``text``: its
        family's options)."""
        tc = hf_config.text_config
        section = (getattr(tc, "rope_parameters", None) or {}).get("mrope_section")
        if section is None:
            raise ValueError(f"{self.name}: the text config has no rope_parameters"
                             "['mrope_section']; is this a Qwen-VL checkpoint?")
        return MultimodalConfig(
            model_type=hf_config.model_type,
            vision=vision,
            text=language_config(tc, rope_type="mrope", mrope_section=tuple(section), **text),
            image_token_id=hf_config.image_token_id,
            feature_layers=[vision.n_layers],
            feature_select_strategy="full",
            hf_config=hf_config,
        )

    def read_vision_config(self, vc: Any) -> QwenVisionConfig:
        """The vision transformer's config (Qwen2-VL's: LayerNorm, plain MLP)."""
        return qwen2_vision_config(vc)

    def convert_state_dict(self, state: dict[str, Tensor],
                           cfg: MultimodalConfig) -> dict[str, Tensor]:
        return {**convert_qwen_vision(state, cfg.vision), **convert_language(state, cfg)}

    def build_image_modules(self, cfg: MultimodalConfig) -> dict[str, nn.Module]:
        return {"vision": QwenVisionTower(cfg.vision), "merger": PatchMerger(cfg.vision)}

    def rotary(self, cfg: LanguageConfig) -> Any:
        return MRotaryEmbedding(cfg.rope_inv_freq, cfg.mrope_section, cfg.rope_attention_scaling)

    def encode_images(
        self, model: Any, pixel_values: Tensor, image_sizes: Tensor | None
    ) -> Float[Tensor, "n_image_tokens d_model"]:
        """``pixel_values`` packed ``[n_patches, dim]`` (HF's layout) or per image
        ``[images, max_patches, dim]`` (``prepare``'s), with ``image_sizes`` the
        ``image_grid_thw [images, 3]``."""
        pixel_values, grid = self._packed(pixel_values, image_sizes)
        return model.merger(model.vision(pixel_values, grid))[0]

    @staticmethod
    def _packed(pixel_values: Tensor, image_sizes: Tensor | None) -> tuple[Tensor, Tensor]:
        """HF's packed ``[n_patches, dim]`` patches and the ``[images, 3]`` grid."""
        if image_sizes is None:
            raise ValueError("Qwen-VL needs image_grid_thw [images, 3] with its pixel_values: "
                             "pass the processor's image_grid_thw as image_sizes=, or build the "
                             "inputs with model.prepare")
        grid = torch.as_tensor(image_sizes).reshape(-1, 3)
        if pixel_values.ndim == 3:
            counts = grid.prod(-1).tolist()
            if len(counts) != pixel_values.shape[0]:
                raise ValueError(f"pixel_values holds {pixel_values.shape[0]} images but "
                                 f"image_grid_thw {len(counts)}: give one grid row per image")
            pixel_values = torch.cat([p[:n] for p, n in zip(pixel_values, counts, strict=True)])
        return pixel_values, grid

    def position_ids(
        self,
        cfg: MultimodalConfig,
        *,
        input_ids: Tensor | None,
        attention_mask: Tensor,
        q_len: int,
        past_kv_cache: KeyValueCache | None = None,
        image_sizes: Tensor | None = None,
    ) -> Tensor:
        """``[3, batch, q_len]``: the prompt's (t, h, w) ids, or, after cached positions, text
        ids continuing from the largest cached id of each row (as HF's ``rope_deltas``)."""
        cached = None if past_kv_cache is None else past_kv_cache.position_ids
        if cached is not None:
            if input_ids is not None and bool((input_ids == cfg.image_token_id).any()):
                raise ValueError("image tokens after cached positions are not supported: run "
                                 "the whole prompt with its images first")
            start = cached.reshape(-1, *cached.shape[-2:]).amax(dim=(0, 2)) + 1  # [batch]
            new_mask = attention_mask[:, -q_len:].long()
            steps = (new_mask.cumsum(-1) - 1).clamp(min=0)
            return (start[:, None] + steps)[None].expand(3, -1, -1)
        if input_ids is None:
            raise ValueError(
                "Qwen-VL's decoder positions depend on the prompt's tokens and images: when "
                "resuming from a residual stream (start_at_layer) pass position_ids, e.g. "
                "model.position_ids(input_ids, attention_mask, image_sizes=image_grid_thw)")
        grid = None if image_sizes is None else torch.as_tensor(image_sizes).reshape(-1, 3)
        positions, _ = mrope_position_ids(input_ids, grid, cfg.image_token_id,
                                          cfg.vision.merge_size, attention_mask[:, -q_len:])
        return positions

    def split_pixel_values(self, pixel_values: Tensor,
                           image_sizes: Tensor | None) -> list[Tensor]:
        """A prompt's packed patches ``[n, dim]`` -> each image's, by ``image_grid_thw``."""
        counts = torch.as_tensor(image_sizes).reshape(-1, 3).prod(-1).tolist()
        return list(pixel_values.split(counts))

    def stack_pixel_values(self, pixel_values: Sequence[Tensor]) -> Tensor:
        """Each image's packed patches ``[n_i, dim]`` -> ``[images, max n_i, dim]``
        (zero padded; ``image_grid_thw`` says how many rows are real)."""
        longest = max(p.shape[0] for p in pixel_values)
        out = pixel_values[0].new_zeros(len(pixel_values), longest, pixel_values[0].shape[-1])
        for i, patches in enumerate(pixel_values):
            out[i, :patches.shape[0]] = patches
        return out

    def image_layout(self, model: Any) -> MergedLayout:
        """Merged cells of the processor's dynamic resolution (its ``min_pixels`` /
        ``max_pixels``); without a processor, the vision config's patch geometry with no
        bound on the pixel count (enough to map a prepared batch's tokens to patches)."""
        processor = getattr(model, "processor", None)
        if processor is not None:
            return MergedLayout.from_image_processor(processor.image_processor)
        vision = model.cfg.vision
        return MergedLayout(vision.patch_size, vision.merge_size, vision.temporal_patch_size,
                            min_pixels=vision.token_size**2, max_pixels=2**62)

    def load_processor(self, path: str, **kwargs: Any) -> Any:
        from mmlens.model.loading.qwen_processor import load_qwen_processor

        return load_qwen_processor(path, **kwargs)


class Qwen25VLFamily(QwenVLFamily):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    hf_class = "Qwen2_5_VLForConditionalGeneration"
    description = ("Qwen2.5-VL (Qwen2-VL with window attention, RMSNorm and gated MLPs in the "
                   "vision transformer)")
    checkpoints = ("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct")

    def read_vision_config(self, vc: Any) -> QwenVisionConfig:
        return qwen25_vision_config(vc)
