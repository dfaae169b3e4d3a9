"""Idefics3 and SmolVLM: a SigLIP-like vision transformer on square tiles, a pixel-shuffle
connector and a Llama decoder.

The processor resizes an image so its longest edge is ``size["longest_edge"]``, then up to
whole tiles of ``max_image_size`` px; it cuts ``rows x cols`` tiles and adds the whole image
resized to one tile (the global view). The prompt holds, per tile,
``<fake_token_around_image><row_r_col_c>`` and the tile's image tokens, a newline after each
row, then ``<fake_token_around_image><global-img>``, the global view's tokens and
``<fake_token_around_image>``; an image that fits one tile is only the global form. Each tile
is pixel-shuffled into ``(tile / patch / scale_factor)^2`` tokens, row-major
(``mmlens.model.idefics3_vision``). The two model types share the network; SmolVLM differs in
the processor only.

The HF module tree read here (``Idefics3ForConditionalGeneration``, transformers >= 5)::

    model.vision_model
        .embeddings.{patch_embedding.{weight, bias}, position_embedding}
        .encoder.layers.{i}.{self_attn.{q,k,v,out}_proj, layer_norm{1,2}, mlp.fc{1,2}}
        .post_layernorm
    model.connector.modality_projection.proj              (no bias)
    model.text_model                                      (LlamaModel)
    lm_head

``pixel_values`` come as the processor gives them, ``[batch, max_images, 3, T, T]`` with
all-zero frames padding the image axis (dropped, as HF drops them), or as ``[tiles, 3, T, T]``;
``image_sizes`` is the processor's ``pixel_attention_mask`` (same layouts, ``[.., T, T]``), or
None for whole tiles, which is what the processor always makes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mmlens.core.sizes import ImageSize
from mmlens.inputs.layouts.split_tiles import SplitTilesLayout
from mmlens.model.config import MultimodalConfig, language_config
from mmlens.model.families.base import Family, stack_padding_images
from mmlens.model.idefics3_vision import (
    PixelShuffleConnector,
    ShuffleVisionConfig,
    ShuffleVisionTower,
)
from mmlens.model.loading.convert import VISION_BLOCK, convert_language, take


def idefics3_config(hf_config: Any) -> MultimodalConfig:
    """Read an HF ``Idefics3Config`` / ``SmolVLMConfig``; raises on what mmlens cannot run."""
    vc, tc = hf_config.vision_config, hf_config.text_config
    if vc.model_type not in ("idefics3_vision", "smolvlm_vision"):
        raise ValueError(f"vision tower {vc.model_type!r} is not supported for "
                         f"{hf_config.model_type}: mmlens supports idefics3_vision and "
                         "smolvlm_vision")
    if tc.model_type != "llama":
        raise ValueError(f"text model {tc.model_type!r} is not supported for "
                         f"{hf_config.model_type}: mmlens supports llama decoders")
    grid, scale = vc.image_size // vc.patch_size, int(hf_config.scale_factor)
    if scale < 1 or grid % scale:
        raise ValueError(f"scale_factor {hf_config.scale_factor} does not divide the "
                         f"{grid}-patch side of a tile ({vc.image_size} px of {vc.patch_size} "
                         "px patches): the pixel shuffle needs a whole number of tokens a side")
    vision = ShuffleVisionConfig(
        d_model=vc.hidden_size, n_heads=vc.num_attention_heads, d_mlp=vc.intermediate_size,
        n_layers=vc.num_hidden_layers, image_size=vc.image_size, patch_size=vc.patch_size,
        scale_factor=scale, n_channels=vc.num_channels, eps=vc.layer_norm_eps,
        act_fn=vc.hidden_act)
    return MultimodalConfig(
        model_type=hf_config.model_type, vision=vision, text=language_config(tc),
        image_token_id=hf_config.image_token_id, feature_layers=[vc.num_hidden_layers],
        feature_select_strategy="full", projector_bias=False, hf_config=hf_config)


def convert_idefics3_state_dict(state: dict[str, Tensor],
                                cfg: MultimodalConfig) -> dict[str, Tensor]:
    """Vision tower (with its post-norm), connector and Llama decoder."""
    v = "model.vision_model."
    out = {
        "vision.embed.W_patch": take(state, v + "embeddings.patch_embedding.weight"),
        "vision.embed.b_patch": take(state, v + "embeddings.patch_embedding.bias"),
        "vision.embed.W_pos": take(state, v + "embeddings.position_embedding.weight"),
        "vision.ln_post.w": take(state, v + "post_layernorm.weight"),
        "vision.ln_post.b": take(state, v + "post_layernorm.bias"),
        "connector.weight": take(state, "model.connector.modality_projection.proj.weight"),
    }
    for layer in range(cfg.vision.n_layers):
        for ours, theirs in VISION_BLOCK.items():
            out[f"vision.blocks.{layer}.{ours}"] = take(
                state, f"{v}encoder.layers.{layer}.{theirs}")
    text = {"model.language_model." + k[len("model.text_model."):]: w
            for k, w in state.items() if k.startswith("model.text_model.")}
    if "lm_head.weight" in state:
        text["lm_head.weight"] = state["lm_head.weight"]
    return {**out, **convert_language(text, cfg)}


def real_tiles(pixel_values: Tensor, pixel_mask: Tensor | None, tile: int
               ) -> tuple[Tensor, Tensor]:
    """The tiles the vision tower runs and their pixel masks, ``[n, 3, T, T]`` and
    ``[n, T, T]``: from ``[batch, images, ...]``, the frames that are not all zero (HF's rule
    for the padding of the image axis)."""
    if pixel_values.ndim == 5:
        pixel_values = pixel_values.flatten(0, 1)
        if pixel_mask is not None:
            pixel_mask = pixel_mask.flatten(0, 1)
        real = (pixel_values != 0).flatten(1).any(1)
        pixel_values = pixel_values[real]
        pixel_mask = pixel_mask[real] if pixel_mask is not None else None
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != tile or pixel_values.shape[-2] != tile:
        raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: this model takes "
                         f"[batch, images, 3, {tile}, {tile}] (the processor's layout) or "
                         f"[tiles, 3, {tile}, {tile}]")
    if pixel_mask is None:
        pixel_mask = torch.ones(pixel_values.shape[0], tile, tile, dtype=torch.bool,
                                device=pixel_values.device)
    if pixel_mask.shape != (pixel_values.shape[0], tile, tile):
        raise ValueError(f"pixel_attention_mask of shape {tuple(pixel_mask.shape)} does not "
                         f"match pixel_values {tuple(pixel_values.shape)}: pass the processor's "
                         "pixel_attention_mask as image_sizes, or none")
    return pixel_values, pixel_mask.bool()


class Idefics3Family(Family):
    name = "idefics3"
    model_types = ("idefics3",)
    hf_class = "Idefics3ForConditionalGeneration"
    prompt_template = "idefics3"
    fixed_preprocessing = "tiles"
    image_sizes_key = "pixel_attention_mask"
    description = ("Idefics3 (SigLIP-like vision transformer on rows x columns of tiles plus a "
                   "global view, pixel-shuffle connector, Llama decoder)")
    checkpoints = ("HuggingFaceM4/Idefics3-8B-Llama3",)
    min_transformers = "5.18"  # 5.14's PIL image processor still needs torchvision

    def read_config(self, hf_config: Any) -> MultimodalConfig:
        return idefics3_config(hf_config)

    def convert_state_dict(self, state: dict[str, Tensor],
                           cfg: MultimodalConfig) -> dict[str, Tensor]:
        return convert_idefics3_state_dict(state, cfg)

    def build_image_modules(self, cfg: MultimodalConfig) -> dict[str, nn.Module]:
        return {"vision": ShuffleVisionTower(cfg.vision),
                "connector": PixelShuffleConnector(cfg.vision, cfg.text.d_model)}

    def encode_images(
        self, model: Any, pixel_values: Tensor, image_sizes: Tensor | None
    ) -> Float[Tensor, "n_image_tokens d_model"]:
        """Every real tile through the tower and the connector, tiles in order."""
        vc = model.cfg.vision
        tiles, pixel_mask = real_tiles(pixel_values.to(model.embed.W_E.dtype), image_sizes,
                                       vc.image_size)
        patch = vc.patch_size
        patch_mask = pixel_mask.unfold(1, patch, patch).unfold(2, patch, patch).flatten(3).any(-1)
        features = model.connector(model.vision(tiles, patch_mask))
        return features.reshape(-1, features.shape[-1])

    def stack_pixel_values(self, pixel_values: Sequence[Tensor]) -> Tensor:
        """Per-example ``[1, images, 3, T, T]`` -> one batch, the image axis padded with zero
        frames as HF's processor pads it."""
        return stack_padding_images(pixel_values)

    def stack_image_sizes(self, image_sizes: Sequence[Tensor]) -> Tensor:
        """Per-example ``pixel_attention_mask`` ``[1, images, T, T]``, padded as the pixels."""
        return self.stack_pixel_values(image_sizes)

    def image_text(self, processor: Any, image: Any, image_token: str, n_image: int) -> str:
        """What the processor writes for the image: per tile its markers and tokens, a newline
        after each row, then the global view (``Idefics3Processor.replace_image_token``)."""
        rows, cols = self._geometry(processor, image).grid(ImageSize.of(image))
        return processor.replace_image_token({"rows": [[rows]], "cols": [[cols]]}, 0)

    def image_layout(self, model: Any) -> SplitTilesLayout:
        """The processor's tiling (rows x cols tiles, then the global view), checked against
        the vision tower."""
        return SplitTilesLayout.from_processor(model.processor.image_processor,
                                               model.cfg.vision)

    @staticmethod
    def _geometry(processor: Any, image: Any) -> SplitTilesLayout:
        """The tiling alone (patch and shuffle sizes from ``image_seq_len``)."""
        ip = processor.image_processor
        tokens_a_side = round(processor.image_seq_len ** 0.5)
        return SplitTilesLayout.from_image_processor(
            ip, ip.max_image_size["longest_edge"] // tokens_a_side, 1)


def load_smolvlm_processor(name_or_path: str, cfg: MultimodalConfig) -> Any:
    """SmolVLM's tokenizer, PIL image processor and chat template, composed into HF's
    ``Idefics3Processor``, which writes the same image text; ``SmolVLMProcessor`` needs a video
    processor and so torchvision. ``image_seq_len`` is the checkpoint's (processor_config.json),
    else the tower's tokens a tile."""
    import json

    from transformers import AutoTokenizer, Idefics3Processor, SmolVLMImageProcessorPil

    from mmlens.core.errors import MMLensError
    from mmlens.inputs.processor import checkpoint_file, read_chat_template

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        image_processor = SmolVLMImageProcessorPil.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise MMLensError(
            f"{name_or_path} has no usable tokenizer or image processor ({error}); a SmolVLM "
            "checkpoint needs its tokenizer files and preprocessor_config.json") from error
    config = checkpoint_file(name_or_path, "processor_config.json")
    seq_len = json.loads(config.read_text()).get("image_seq_len") if config else None
    expected = cfg.vision.tokens_per_tile
    if seq_len is not None and seq_len != expected:
        raise MMLensError(f"processor_config.json gives image_seq_len {seq_len} but the vision "
                          f"tower makes {expected} tokens a tile: is it from this checkpoint?")
    return Idefics3Processor(image_processor, tokenizer, image_seq_len=expected,
                             chat_template=read_chat_template(name_or_path, tokenizer))


class SmolVLMFamily(Idefics3Family):
    name = "smolvlm"
    model_types = ("smolvlm",)
    hf_class = "SmolVLMForConditionalGeneration"
    description = ("SmolVLM (Idefics3's network: SigLIP-like vision transformer on tiles plus "
                   "a global view, pixel-shuffle connector, Llama decoder)")
    checkpoints = ("HuggingFaceTB/SmolVLM-256M-Instruct", "HuggingFaceTB/SmolVLM-500M-Instruct")

    def load_processor(self, path: str, **kwargs: Any) -> Any:
        """Composed from the checkpoint's parts (HF's ``SmolVLMProcessor`` needs torchvision)."""
        from transformers import AutoConfig

        return load_smolvlm_processor(path, self.read_config(AutoConfig.from_pretrained(path)))
