"""Llama-3.2-Vision (Mllama): a tiled vision encoder whose features reach the text only
through gated cross-attention layers; the image never enters the token sequence.

The prompt holds one ``<|image|>`` token per image (an ordinary embedding); every text
position from it on sees that image's tiles, HF's cross-attention mask (the processor's
``cross_attention_mask``, recomputed here from the tokens and ``aspect_ratio_ids``)::

    pixel_values [batch, images, tiles, 3, H, W] ─▶ vision.* ─▶ projector.hook_out
        ─▶ image keys [batch, images x tiles x tokens, d_model]
    input_ids ─▶ hook_token_embed ─▶ hook_embed ─▶ blocks.{l}.attn.* (self-attention layers)
                                              └─▶ blocks.{l}.cross_attn.* (cross_attention_layers)

Layers are numbered as HF's decoder layers, the cross-attention layers included. The
geometry key is ``aspect_ratio_ids`` ``[batch, images]`` (0 for a padding image).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mmlens.core.errors import MMLensError
from mmlens.inputs.layouts.cross_tiles import CrossTilesLayout
from mmlens.model.components import Embed
from mmlens.model.components.blocks import LanguageBlock
from mmlens.model.components.cross_attention import CrossAttentionBlock, CrossAttentionInputs
from mmlens.model.components.mllama_vision import (
    LinearProjector,
    MllamaVisionConfig,
    MllamaVisionTower,
)
from mmlens.model.config import LanguageConfig, MultimodalConfig, language_config
from mmlens.model.families.base import Family, stack_padding_images
from mmlens.model.loading.convert_mllama import convert_mllama


def mllama_vision_config(vc: Any) -> MllamaVisionConfig:
    """Read an ``MllamaVisionConfig``; raises on settings the tower cannot run. (A tile always
    has padding rows: patches + 1 is never a multiple of 8 for a square grid.)"""
    cfg = MllamaVisionConfig(
        d_model=vc.hidden_size, n_heads=vc.attention_heads, d_mlp=vc.intermediate_size,
        n_layers=vc.num_hidden_layers, n_global_layers=vc.num_global_layers,
        image_size=vc.image_size, patch_size=vc.patch_size, max_tiles=vc.max_num_tiles,
        supported_aspect_ratios=tuple(tuple(r) for r in vc.supported_aspect_ratios),
        intermediate_layers=tuple(vc.intermediate_layers_indices), n_channels=vc.num_channels,
        eps=vc.norm_eps, act_fn=vc.hidden_act)
    if cfg.d_out != vc.vision_output_dim:
        raise MMLensError(f"mllama: vision_output_dim {vc.vision_output_dim} is not "
                          f"hidden_size x (1 + {len(cfg.intermediate_layers)} intermediate "
                          f"layers) = {cfg.d_out}")
    if any(not 0 <= i < cfg.n_layers for i in cfg.intermediate_layers):
        raise MMLensError(f"mllama: intermediate_layers_indices {list(cfg.intermediate_layers)}"
                          f" must be local vision layers of the {cfg.n_layers}")
    return cfg


def cross_attention_token_mask(input_ids: Tensor, image_token_id: int, n_tiles: Tensor,
                               max_tiles: int) -> Tensor:
    """HF's processor rule, ``[batch, text, images, max_tiles]`` over ``n_tiles [batch,
    images]`` real tiles: each ``<|image|>`` is seen from its position up to the next one (a run
    of consecutive image tokens, all of them to the end), the last to the end."""
    batch, length = input_ids.shape
    n_images = n_tiles.shape[1]
    mask = torch.zeros(batch, length, n_images, max_tiles, dtype=torch.bool,
                       device=input_ids.device)
    for row in range(batch):
        starts = (input_ids[row] == image_token_id).nonzero().flatten().tolist()
        ends = [*starts[1:], length]
        for i in range(len(starts) - 2, -1, -1):  # consecutive: to the end of the run's reach
            if ends[i] == starts[i] + 1:
                ends[i] = ends[i + 1]
        for image, (start, end) in enumerate(zip(starts[:n_images], ends, strict=False)):
            mask[row, start:end, image, :int(n_tiles[row, image])] = True
    return mask


class MllamaFamily(Family):
    name = "mllama"
    model_types = ("mllama",)
    hf_class = "MllamaForConditionalGeneration"
    image_sizes_key = "aspect_ratio_ids"
    prompt_template = "mllama"
    derived_names = ("aspect_ratio_mask", "cross_attention_mask")
    fixed_preprocessing = "tiles"
    description = ("Llama-3.2-Vision (tiled vision encoder with gated positions and a gated "
                   "global transformer, gated cross-attention layers in a Llama decoder)")
    min_transformers = "5.23"  # before it, HF's rows that see no image differ (5.22.2)
    checkpoints = ("meta-llama/Llama-3.2-11B-Vision-Instruct",
                   "meta-llama/Llama-3.2-11B-Vision")

    def preprocessing_mode(self, model: Any, mode: str | None) -> str:
        """``"tiles"``: the processor tiles every image itself; any other mode is refused."""
        if mode not in (None, "tiles"):
            raise MMLensError(f"preprocessing {mode!r} does not fit mllama, whose processor "
                              "tiles each image itself: leave preprocessing unset")
        return "tiles"

    def check_derived(self, model: Any, outputs: dict[str, Any]) -> None:
        """The processor's ``aspect_ratio_mask`` and ``cross_attention_mask`` must be what the
        tokens and ``aspect_ratio_ids`` give: the model recomputes them (a hand-edited mask
        would be silently ignored otherwise)."""
        ids, ratios = outputs.get("input_ids"), outputs.get("image_sizes")
        if ratios is None or ids is None:
            return
        vision, ratios = model.cfg.vision, torch.as_tensor(ratios)
        tiles = model.vision.tile_mask(ratios.reshape(-1)).view(*ratios.shape, -1)
        computed = {"aspect_ratio_mask": tiles,
                    "cross_attention_mask": cross_attention_token_mask(
                        ids, model.cfg.image_token_id, vision.n_tiles(ratios), vision.max_tiles)}
        for name, ours in computed.items():
            given = outputs.get(name)
            if given is not None and not torch.equal(torch.as_tensor(given).bool().cpu(),
                                                     ours.cpu()):
                raise MMLensError(
                    f"{name} differs from what input_ids and aspect_ratio_ids give: mllama "
                    f"recomputes it (to block image keys use block_attention); pass the "
                    "processor's outputs together, unedited")

    def read_config(self, hf_config: Any) -> MultimodalConfig:
        tc = hf_config.text_config
        text = language_config(
            tc, cross_attention_layers=tuple(int(i) for i in tc.cross_attention_layers),
            d_vocab_embed=tc.vocab_size + 8, original_architecture="MllamaForCausalLM")
        if any(not 0 <= i < text.n_layers for i in text.cross_attention_layers):
            raise MMLensError(f"mllama: cross_attention_layers {list(tc.cross_attention_layers)}"
                              f" must be decoder layers of the {text.n_layers}")
        return MultimodalConfig(
            model_type=hf_config.model_type, vision=mllama_vision_config(hf_config.vision_config),
            text=text, image_token_id=hf_config.image_token_index, feature_layers=[],
            feature_select_strategy="full", hf_config=hf_config)

    def convert_state_dict(self, state: dict[str, Tensor],
                           cfg: MultimodalConfig) -> dict[str, Tensor]:
        return convert_mllama(state, cfg)

    def build_image_modules(self, cfg: MultimodalConfig) -> dict[str, nn.Module]:
        return {"vision": MllamaVisionTower(cfg.vision),
                "projector": LinearProjector(cfg.vision.d_out, cfg.text.d_model)}

    def build_embed(self, cfg: LanguageConfig) -> nn.Module:
        """The embedding has rows past the unembedding (``<|image|>`` among them)."""
        return Embed(cfg.d_vocab_embed or cfg.d_vocab, cfg.d_model)

    def build_blocks(self, cfg: LanguageConfig) -> nn.ModuleList:
        return nn.ModuleList([CrossAttentionBlock(cfg) if layer in cfg.cross_attention_layers
                              else LanguageBlock(cfg) for layer in range(cfg.n_layers)])

    def encode_images(
        self, model: Any, pixel_values: Tensor, image_sizes: Tensor | None
    ) -> Float[Tensor, "n_image_keys d_model"]:
        """``pixel_values [batch, images, tiles, 3, H, W]`` with ``aspect_ratio_ids [batch,
        images]`` -> one row per cross-attention key (image, tile, token; padding images and
        tiles included, as HF's keys are)."""
        if image_sizes is None or pixel_values.ndim != 6:
            raise MMLensError("mllama takes pixel_values [batch, images, tiles, 3, H, W] with "
                              "image_sizes = the processor's aspect_ratio_ids [batch, images]")
        ids = image_sizes.to(pixel_values.device).reshape(-1)
        tiles = model.vision(pixel_values.flatten(0, 1), ids)
        return model.projector(tiles).reshape(-1, model.cfg.text.d_model)

    def merge(self, input_ids: Tensor, embeds: Tensor, features: Tensor | None,
              cfg: MultimodalConfig) -> Tensor:
        """The image stays out of the sequence: the embeddings are unchanged."""
        return embeds

    def cross_attention(self, model: Any, input_ids: Tensor, features: Tensor,
                        image_sizes: Tensor | None) -> CrossAttentionInputs:
        """The image keys of each prompt and HF's mask over them (``hook_mask``'s input): a
        text row sees the real tiles of the images before it; a row that sees none is opened
        to every key, HF's rule (its MLP output is zeroed: ``rows``)."""
        vision = model.cfg.vision
        ids = image_sizes.to(input_ids.device)
        states = features.view(ids.shape[0], -1, features.shape[-1])
        if ids.shape[0] != input_ids.shape[0]:  # prompts without an image among the batch
            states, ids = self._pad_text_only_rows(model, input_ids, states, ids)
        tokens = cross_attention_token_mask(input_ids, model.cfg.image_token_id,
                                            vision.n_tiles(ids), vision.max_tiles)
        mask = tokens.repeat_interleave(vision.n_tokens, dim=3).flatten(2)[:, None]
        rows = mask.any(-1)[:, 0]
        return CrossAttentionInputs(states, mask | ~rows[:, None, :, None], rows)

    def _pad_text_only_rows(self, model: Any, input_ids: Tensor, states: Tensor,
                            ids: Tensor) -> tuple[Tensor, Tensor]:
        """Image keys for a batch whose pixel values hold only the prompts with images (in
        order): the text-only prompts get what HF's processor gives them, padding images
        (zero pixels, aspect ratio id 0); a text row that sees no image averages every key
        of its prompt, HF's rule, so these keys count."""
        has_image = (input_ids == model.cfg.image_token_id).any(-1)
        if int(has_image.sum()) != ids.shape[0]:
            raise MMLensError(
                f"pixel_values hold {ids.shape[0]} prompts' images but {int(has_image.sum())} "
                f"of the {input_ids.shape[0]} prompts have an image token: pass pixel_values "
                "[batch, images, tiles, 3, H, W] with one row per prompt (the processor's), or "
                "one row per prompt with an image (prepare's)")
        vision = model.cfg.vision
        blank = torch.zeros(1, ids.shape[1], vision.max_tiles, vision.n_channels,
                            vision.image_size, vision.image_size, device=states.device,
                            dtype=model.embed.W_E.dtype)
        padding = self.encode_images(model, blank, ids.new_zeros(1, ids.shape[1]))
        full = padding.view(1, -1, states.shape[-1]).repeat(input_ids.shape[0], 1, 1)
        full[has_image] = states
        full_ids = ids.new_zeros(input_ids.shape[0], ids.shape[1])
        full_ids[has_image] = ids
        return full, full_ids

    def image_layout(self, model: Any) -> CrossTilesLayout:
        """The processor's tiling; the map's tokens are the cross-attention keys (tile class
        tokens and patches, padding tiles included). Without a processor, the vision config's
        tiles (HF's processor tiles the same way)."""
        vision = model.cfg.vision
        processor = getattr(model, "processor", None)
        if processor is not None:
            return CrossTilesLayout.from_image_processor(processor.image_processor, vision)
        return CrossTilesLayout(vision.image_size, vision.patch_size, vision.max_tiles,
                                vision.n_padded, vision.supported_aspect_ratios)

    def stack_pixel_values(self, pixel_values: Sequence[Tensor]) -> Tensor:
        """Per-prompt ``[1, images, tiles, 3, H, W]`` -> one batch, the image axis padded with
        zero frames (padding images) as HF's processor pads it."""
        return stack_padding_images(pixel_values)

    def stack_image_sizes(self, image_sizes: Sequence[Tensor]) -> Tensor:
        """Per-prompt ``aspect_ratio_ids [1, images]``, padded with 0 (a padding image)."""
        return self.stack_pixel_values(image_sizes)
