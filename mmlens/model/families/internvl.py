"""InternVL 3: InternViT on dynamic tiles plus a thumbnail, pixel shuffle, a LayerNorm + MLP
projector and a Qwen2 decoder (``InternVLForConditionalGeneration``, not remote code).

The GotOcr2 image processor cuts each image into the grid of ``S x S`` tiles whose aspect ratio
is closest to the image's (at most ``max_patches``), and adds a thumbnail (the whole image at
``S x S``) when there is more than one tile. Every tile is one row of the tower; its ``g x g``
patches are pixel-shuffled into ``g/2 x g/2`` image tokens (``mmlens.model.intern_vision``).
In the prompt an image is ``<img>`` + ``<IMG_CONTEXT>`` x (tokens per tile x tiles) +
``</img>``, tiles in reading order, the thumbnail last; features replace the ``<IMG_CONTEXT>``
tokens in order. Positions are 1D. HF's ``InternVLProcessor`` needs a video processor (and so
torchvision); the family composes the tokenizer, the PIL image processor and the chat template
(``mmlens.model.loading.internvl_processor``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mmlens.inputs.layouts.tiles import TilesLayout
from mmlens.model.config import MultimodalConfig, language_config_from_hf
from mmlens.model.families.base import Family
from mmlens.model.intern_vision import InternVisionTower, ShuffleProjector
from mmlens.model.loading.convert_internvl import convert_internvl, internvl_vision_config


class InternVLFamily(Family):
    name = "internvl"
    fixed_preprocessing = "dynamic_tiles"
    model_types = ("internvl",)
    hf_class = "InternVLForConditionalGeneration"
    description = ("InternVL 3 (InternViT on dynamic tiles plus a thumbnail, 2x2 pixel "
                   "shuffle, LayerNorm + MLP projector, Qwen2 decoder)")
    checkpoints = ("OpenGVLab/InternVL3-1B-hf", "OpenGVLab/InternVL3-2B-hf",
                   "OpenGVLab/InternVL3-8B-hf")
    image_sizes_key = "image_sizes"  # prepare's tile counts; HF's processor gives none
    prompt_template = "internvl"

    def read_config(self, hf_config: Any) -> MultimodalConfig:
        vision, feature = internvl_vision_config(hf_config)
        return MultimodalConfig(
            model_type="internvl", vision=vision,
            text=language_config_from_hf(hf_config.text_config),
            image_token_id=hf_config.image_token_id, feature_layers=[feature],
            feature_select_strategy=hf_config.vision_feature_select_strategy,
            projector_act=hf_config.projector_hidden_act, hf_config=hf_config)

    def convert_state_dict(self, state: dict[str, Tensor],
                           cfg: MultimodalConfig) -> dict[str, Tensor]:
        return convert_internvl(state, cfg)

    def build_image_modules(self, cfg: MultimodalConfig) -> dict[str, nn.Module]:
        return {"vision": InternVisionTower(cfg.vision),
                "projector": ShuffleProjector(cfg.vision, cfg.text.d_model, cfg.projector_act)}

    def encode_images(
        self, model: Any, pixel_values: Tensor, image_sizes: Tensor | None
    ) -> Float[Tensor, "n_image_tokens d_model"]:
        """Every image's tiles (thumbnails included), in order -> one feature per image token.

        ``pixel_values``: HF's ``[tiles, 3, S, S]``, or ``prepare``'s ``[examples, most
        tiles, 3, S, S]`` (zero padded) with ``image_sizes`` ``[examples, 1]`` (the
        processor's ``num_patches``) saying how many tiles are real.
        """
        features = model.projector(model.vision(self._tiles(pixel_values, image_sizes).to(
            model.embed.W_E.dtype)))
        return features.reshape(-1, features.shape[-1])

    @staticmethod
    def _tiles(pixel_values: Tensor, image_sizes: Tensor | None) -> Tensor:
        if pixel_values.ndim == 4:
            return pixel_values
        if image_sizes is None or pixel_values.ndim != 5:
            raise ValueError(
                f"InternVL takes pixel_values [tiles, 3, S, S], or [examples, tiles, 3, S, S] "
                f"with image_sizes (the processor's num_patches); got "
                f"{list(pixel_values.shape)}{'' if image_sizes is not None else ' without'}"
                f"{' image_sizes' if image_sizes is None else ''}: use model.prepare")
        counts = image_sizes.reshape(len(image_sizes), -1)[:, 0].tolist()
        if len(counts) != len(pixel_values) or max(counts) > pixel_values.shape[1]:
            raise ValueError(f"image_sizes {counts} (tiles an image) do not fit pixel_values "
                             f"{list(pixel_values.shape)}: were they prepared together?")
        return torch.cat([tiles[:n] for tiles, n in zip(pixel_values, counts, strict=True)])

    def processor_sizes(self, model: Any, out: Any) -> Tensor:
        """Each image's tile count ``[images, 1]`` (the image processor's ``num_patches``,
        which HF's processor drops), read off the prompt: an image's run of image tokens is
        ``tokens_per_tile`` per tile."""
        ids = torch.as_tensor(out["input_ids"])[0]
        is_image = torch.cat([torch.tensor([False]), ids == model.cfg.image_token_id,
                              torch.tensor([False])])
        edges = (is_image[1:].int() - is_image[:-1].int()).nonzero().flatten()
        runs = edges[1::2] - edges[::2]
        per_tile = model.cfg.vision.tokens_per_tile
        if bool((runs % per_tile).any()) or len(runs) * per_tile == 0 or (
                int(runs.sum()) // per_tile != len(out["pixel_values"])):
            raise ValueError(f"the prompt's image-token runs {runs.tolist()} are not "
                             f"{per_tile} per tile of its {len(out['pixel_values'])} tiles: "
                             "was it processed with this model's processor?")
        return (runs // per_tile).reshape(-1, 1)

    def image_text(self, processor: Any, image: Any, image_token: str, n_image: int) -> str:
        """``<img>`` + the image tokens + ``</img>``, as the processor writes an image."""
        start, end = processor.image_wrap
        return start + image_token * n_image + end

    def split_pixel_values(self, pixel_values: Tensor,
                           image_sizes: Tensor | None) -> list[Tensor]:
        """A prompt's tiles ``[n, 3, S, S]`` -> each image's, by ``num_patches``."""
        counts = torch.as_tensor(image_sizes).reshape(-1).tolist()
        return list(pixel_values.split(counts))

    def stack_pixel_values(self, pixel_values: Sequence[Tensor]) -> Tensor:
        """Each image's tiles ``[n_i, 3, S, S]`` -> ``[images, max n_i, 3, S, S]`` (zero
        padded; ``num_patches`` says how many are real), so a batch slices by image."""
        longest = max(p.shape[0] for p in pixel_values)
        out = pixel_values[0].new_zeros(len(pixel_values), longest, *pixel_values[0].shape[1:])
        for i, tiles in enumerate(pixel_values):
            out[i, :tiles.shape[0]] = tiles
        return out

    def load_processor(self, path: str, **kwargs: Any) -> Any:
        """Composed from the checkpoint's parts (HF's processor needs torchvision)."""
        from transformers import AutoConfig

        from mmlens.model.loading.internvl_processor import load_internvl_processor

        cfg = self.read_config(AutoConfig.from_pretrained(path))
        return load_internvl_processor(path, cfg.vision.tokens_per_tile, **kwargs)

    def preprocessing_mode(self, model: Any, mode: str | None) -> str:
        """Any known mode: the tiling is the processor's, and ``image_layout`` follows it
        (``"pad"``: through the square the image was padded to first)."""
        return Family.preprocessing_mode(self, model, mode)

    def image_layout(self, model: Any) -> TilesLayout:
        """The processor's tiles plus a thumbnail, 2x2 pixel shuffle, a class token in each
        tower row; without a processor, the vision config's tile with the processor's default
        bounds on the tile count."""
        processor = getattr(model, "processor", None)
        if processor is not None:
            return TilesLayout.from_image_processor(processor.image_processor, model.cfg.vision)
        vision = model.cfg.vision
        return TilesLayout(vision.image_size, vision.patch_size,
                           shuffle=round(1 / vision.shuffle_scale))
