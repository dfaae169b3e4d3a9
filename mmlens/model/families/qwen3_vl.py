"""Qwen3-VL: the Qwen vision transformer with learned positions and DeepStack, and a Qwen3
decoder (per-head q/k RMSNorm) with interleaved multimodal rotary positions.

Images come as Qwen2-VL's do (flattened patches with ``image_grid_thw``; 16 px patches, 2x2
merged into one 32 px token). The tower adds a learned square table of positions, resampled
bilinearly to each image's grid, to the patch embedding. Besides the final merger, the blocks
of ``deepstack_visual_indexes`` feed their own mergers, whose features are added to the
outputs of the first decoder blocks at the image tokens::

    pixel_values ─▶ vision.hook_embed (+ hook_pos_embed) ─▶ vision.blocks.{i}.* ─▶ merger.*
                                        └─ blocks i in deepstack_visual_indexes ─▶ deepstack.{j}.*
    input_ids ─▶ hook_token_embed ──┴─ merge at <|image_pad|> ─▶ hook_embed ─▶ blocks.{l}.*
    deepstack.{j}.hook_out ─▶ blocks.{j}.hook_deepstack (added to block j's output)

Decoder positions are Qwen2-VL's (t, h, w) ids; the rotary reads them interleaved.
"""

from __future__ import annotations

from typing import Any

from jaxtyping import Float
from torch import Tensor, nn

from mmlens.model.components.blocks import LanguageBlock
from mmlens.model.components.deepstack import DeepStackBlock
from mmlens.model.components.mrope import MRotaryEmbedding
from mmlens.model.components.qwen_vision import PatchMerger, QwenVisionTower
from mmlens.model.config import LanguageConfig, MultimodalConfig
from mmlens.model.families.qwen_vl import QwenVLFamily
from mmlens.model.loading.convert_qwen3 import convert_qwen3_vl, qwen3_vision_config


class Qwen3VLFamily(QwenVLFamily):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    hf_class = "Qwen3VLForConditionalGeneration"
    prompt_template = "qwen3_vl"
    description = ("Qwen3-VL (Qwen vision transformer with learned positions and DeepStack "
                   "features added into the first decoder layers, Qwen3 decoder with "
                   "interleaved M-RoPE)")
    checkpoints = ("Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-4B-Instruct",
                   "Qwen/Qwen3-VL-8B-Instruct")

    def read_config(self, hf_config: Any) -> MultimodalConfig:
        vision = qwen3_vision_config(hf_config)
        n_layers = hf_config.text_config.num_hidden_layers
        # HF adds the j-th DeepStack features after block j while there are blocks
        return self._config(hf_config, vision, mrope_interleaved=True, qk_norm=True,
                            original_architecture="Qwen3ForCausalLM",
                            deepstack_layers=min(len(vision.deepstack_layers), n_layers))

    def convert_state_dict(self, state: dict[str, Tensor],
                           cfg: MultimodalConfig) -> dict[str, Tensor]:
        return convert_qwen3_vl(state, cfg)

    def build_image_modules(self, cfg: MultimodalConfig) -> dict[str, nn.Module]:
        deepstack = [PatchMerger(cfg.vision, postshuffle_norm=True)
                     for _ in cfg.vision.deepstack_layers]
        return {"vision": QwenVisionTower(cfg.vision), "merger": PatchMerger(cfg.vision),
                "deepstack": nn.ModuleList(deepstack)}

    def build_blocks(self, cfg: LanguageConfig) -> nn.ModuleList:
        return nn.ModuleList([DeepStackBlock(cfg) if layer < cfg.deepstack_layers
                              else LanguageBlock(cfg) for layer in range(cfg.n_layers)])

    def rotary(self, cfg: LanguageConfig) -> Any:
        return MRotaryEmbedding(cfg.rope_inv_freq, cfg.mrope_section, cfg.rope_attention_scaling,
                                interleaved=True)

    def encode_images(
        self, model: Any, pixel_values: Tensor, image_sizes: Tensor | None
    ) -> Float[Tensor, "n_image_tokens d_model"]:
        return self.encode_image_layers(model, pixel_values, image_sizes)[0]

    def encode_image_layers(
        self, model: Any, pixel_values: Tensor, image_sizes: Tensor | None
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """The merged features and, for decoder block ``j``, the ``j``-th DeepStack features
        (vision blocks in increasing order, each through the merger of its index in
        ``deepstack_visual_indexes``, as HF pairs them)."""
        pixel_values, grid = self._packed(pixel_values, image_sizes)
        layers = model.cfg.vision.deepstack_layers
        final, kept = model.vision.run(pixel_values, grid, keep=layers)
        added = {j: model.deepstack[layers.index(layer)](states)[0]
                 for j, (layer, states) in enumerate(zip(sorted(layers), kept, strict=True))
                 if j < model.cfg.text.deepstack_layers}
        return model.merger(final)[0], added
