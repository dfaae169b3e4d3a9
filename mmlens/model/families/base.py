"""What a model family is: the declarative adapter the hooked model is built and run from.

A family answers, for one line of Hugging Face checkpoints, every question that differs from
one multimodal model to the next; ``HookedMultimodalTransformer`` asks its family and never
looks at the model type itself::

    HF config ──read_config──▶ MultimodalConfig
    HF state dict ──convert_state_dict──▶ our weights (rename tables)
    build_image_modules ──▶ vision tower, connector (and packer): registered in this order
    pixel_values ──encode_images──▶ image features [n_image_tokens, d_model]
        (encode_image_layers: also features added after some decoder layers, DeepStack)
    token embeddings + features ──merge──▶ hook_embed
    input_ids (+ cache, image sizes) ──position_ids──▶ decoder positions ──rotary──▶ cos, sin
    attention_mask (+ token kinds) ──attention_masks──▶ one "may attend" mask per layer
    build_embed / build_blocks / build_final_norm / final_logits: the decoder's parts
    prepare: stack_pixel_values, add_image_spans, image_layout (the processor's geometry)

Subclasses set the class attributes and override the methods whose rule differs; a new family
is one module in this package plus an entry in ``FAMILIES``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mmlens.inputs.token_map import ImageLayout
from mmlens.model.components import Embed, RMSNorm, RotaryEmbedding
from mmlens.model.config import LanguageConfig, MultimodalConfig
from mmlens.model.kv_cache import KeyValueCache
from mmlens.model.language import LanguageStack, build_mask, positions_from_mask
from mmlens.model.merge import merge_image_features

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer.json",
                   "tokenizer_config.json", "tokenizer.model")


def stack_padding_images(per_prompt: Sequence[Tensor]) -> Tensor:
    """Per-prompt ``[1, images, ...]`` -> one batch, the image axis padded with zero frames as
    HF's processors pad it (Idefics3's pixels and masks, Mllama's pixels and aspect ratio
    ids)."""
    most = max(p.shape[1] for p in per_prompt)
    return torch.cat([torch.cat([p, p.new_zeros(1, most - p.shape[1], *p.shape[2:])], 1)
                      for p in per_prompt])


class Family:
    """The adapter of one family of checkpoints; instances are stateless singletons.

    Class attributes:
        name: the registry key and the HF ``model_type`` of the family's configs.
        model_types: every HF ``model_type`` it accepts (usually just ``name``).
        hf_class: the ``transformers`` class that loads the checkpoint.
        description: one line for error messages and docs.
        checkpoints: example hub names, for error messages and docs.
        image_sizes_key: the processor output carrying each image's geometry, passed to the
            model as ``image_sizes`` (LLaVA-NeXT: ``image_sizes``; Qwen-VL: ``image_grid_thw``).
    """

    name: ClassVar[str]
    fixed_preprocessing: ClassVar[str | None] = None
    """The geometry the family's processor fixes ("anyres", "dynamic", "tiles": Mllama's
    tiling, images never padded by ``prepare``), else None."""
    model_types: ClassVar[tuple[str, ...]]
    hf_class: ClassVar[str]
    description: ClassVar[str]
    checkpoints: ClassVar[tuple[str, ...]] = ()
    min_transformers: ClassVar[str | None] = None
    """The oldest ``transformers`` the conformance suite passes on for this family, where it
    is newer than the package's own lower bound; an older one is refused at load time."""
    image_sizes_key: ClassVar[str] = "image_sizes"
    processor_keys: ClassVar[tuple[str, ...]] = ()
    """Further processor outputs the family reads, each a ``forward`` argument of the same
    name (Gemma 3, PaliGemma: ``token_type_ids``, which their mask rules read); the model
    refuses them for a family that does not list them."""
    prompt_template: ClassVar[str | None] = None
    """The name of the family's default prompt template (``mmlens.inputs.templates``); None:
    chosen from the tokenizer's vocabulary."""
    derived_names: ClassVar[tuple[str, ...]] = ()
    """Processor outputs the family recomputes from the others (Llama-3.2-Vision's
    ``aspect_ratio_mask``, ``cross_attention_mask``): accepted at the door and checked
    (``check_derived``)."""
    pixel_rule: ClassVar[bool] = False
    """Whether the paper's red-pixel rule (``related_rule="paper"``) is defined for the family
    (the paper's own: LLaVA-1.5 and LLaVA-NeXT)."""

    # ------------------------------------------------------------- configuration and weights
    def read_config(self, hf_config: Any) -> MultimodalConfig:
        """The HF config -> ``MultimodalConfig``; raises on settings the family cannot run."""
        raise NotImplementedError

    def convert_state_dict(self, state: dict[str, Tensor],
                           cfg: MultimodalConfig) -> dict[str, Tensor]:
        """The HF state dict -> ours (a renaming: HF's ``[out, in]`` layouts are kept)."""
        raise NotImplementedError

    def load_processor(self, path: str, **kwargs: Any) -> Any:
        """The checkpoint's processor (HF's ``AutoProcessor``); raises when it has no usable
        one, so a model never loads without the processor ``prepare`` needs. The error says
        which half failed: the tokenizer, or the processor as a whole."""
        import transformers

        from mmlens.core.errors import MMLensError

        try:
            processor = transformers.AutoProcessor.from_pretrained(path, **kwargs)
        except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
            present = [f for f in PROCESSOR_FILES if (Path(path) / f).is_file()]
            if not present and Path(path).is_dir():
                raise MMLensError(
                    f"{path} has no usable processor (no tokenizer or image processor files): "
                    "save the checkpoint's processor beside its weights") from err
            part, cause = "processor (tokenizer and image processor)", err
            try:  # which half failed: the tokenizer alone is the common culprit
                transformers.AutoTokenizer.from_pretrained(path, **kwargs)
            except Exception as tokenizer_err:  # noqa: BLE001 - as above
                part, cause = "tokenizer", tokenizer_err
            raise MMLensError(
                f"the {part} of {path} failed to load: "
                f"{type(cause).__name__}: {str(cause).strip() or 'no detail'}"
                f"{' (files: ' + ', '.join(present) + ')' if present else ''}"
                ". Save or restore the checkpoint's processor (tokenizer and image processor) "
                "beside its weights"
            ) from err
        if getattr(processor, "tokenizer", None) is None or getattr(
                processor, "image_processor", None) is None:
            raise MMLensError(f"the processor of {path} has no tokenizer or no image processor: "
                              "save the checkpoint's full processor beside its weights")
        return processor

    def check_derived(self, model: Any, outputs: dict[str, Any]) -> None:
        """Raise where a processor output of ``derived_names`` disagrees with what the family
        computes from the others (``outputs``: the keywords, ``image_sizes`` read)."""

    def hf_model_class(self) -> type:
        import transformers

        return getattr(transformers, self.hf_class)

    # ------------------------------------------------------------- modules and forward rules
    def build_image_modules(self, cfg: MultimodalConfig) -> dict[str, nn.Module]:
        """The image-side modules, by attribute name, in data-flow order (their hook names are
        ``{name}.*``, e.g. ``vision.*``, ``projector.*``)."""
        raise NotImplementedError

    def encode_images(
        self, model: Any, pixel_values: Tensor, image_sizes: Tensor | None
    ) -> Float[Tensor, "n_image_tokens d_model"]:
        """Pixels -> image features in text width, one row per image token, in input order."""
        raise NotImplementedError

    def encode_image_layers(
        self, model: Any, pixel_values: Tensor, image_sizes: Tensor | None
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """``encode_images`` and, by decoder layer, features added to that layer's output at the
        image tokens (Qwen3-VL's DeepStack); none by default."""
        return self.encode_images(model, pixel_values, image_sizes), {}

    def merge(
        self,
        input_ids: Int[Tensor, "batch pos"],
        embeds: Float[Tensor, "batch pos d_model"],
        features: Float[Tensor, "n_image_tokens d_model"] | None,
        cfg: MultimodalConfig,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Features replace the image tokens' embeddings, in order (the common rule)."""
        return merge_image_features(input_ids, embeds, features, cfg.image_token_id)

    def cross_attention(self, model: Any, input_ids: Tensor, features: Tensor,
                        image_sizes: Tensor | None) -> Any:
        """What the cross-attention layers attend to (``CrossAttentionInputs``: the image
        keys, which text rows see which keys), from ``encode_image_layers``'s features; None
        for a family whose image tokens sit in the sequence."""
        return None

    def build_blocks(self, cfg: LanguageConfig) -> nn.ModuleList:
        """The decoder blocks (``blocks.{l}.*``); Llama-style by default, options from ``cfg``
        (``qkv_bias``, ``o_bias``, ``mlp_bias``, grouped-query heads)."""
        return LanguageStack.build_blocks(cfg)

    def build_embed(self, cfg: LanguageConfig) -> nn.Module:
        """The token embedding (``embed``, ``W_E``); Gemma's scales it by ``sqrt(d_model)``."""
        return Embed(cfg.d_vocab, cfg.d_model)

    def build_final_norm(self, cfg: LanguageConfig) -> nn.Module:
        """The norm before the unembedding (``ln_final``)."""
        return RMSNorm(cfg.d_model, cfg.eps)

    def final_logits(self, logits: Tensor, cfg: MultimodalConfig) -> Tensor:
        """The unembedding's output -> the model's logits (Gemma 2: soft-capped)."""
        return logits

    def attention_masks(
        self,
        cfg: MultimodalConfig,
        *,
        attention_mask: Int[Tensor, "batch k_pos"],
        q_len: int,
        input_ids: Int[Tensor, "batch pos"] | None,
        token_type_ids: Int[Tensor, "batch pos"] | None = None,
        past_kv_cache: KeyValueCache | None = None,
    ) -> list[Tensor | None]:
        """The mask rule: one boolean "may attend" mask ``[batch, 1, q_pos, k_pos]`` per
        decoder layer (None = plain causal), which ``blocks.{l}.attn.hook_mask`` receives and a
        knockout ANDs its blocked edges into. Causal with padding by default.

        ``attention_mask`` covers the cached and the new positions (new ones last);
        ``token_type_ids`` (1 = image token, as Gemma's processor gives them) stand in for
        ``input_ids`` when a run resumes from a residual stream.
        """
        return [build_mask(attention_mask, q_len)] * cfg.text.n_layers

    def token_type_ids(self, cfg: MultimodalConfig,
                       input_ids: Int[Tensor, "batch pos"]) -> Tensor | None:
        """The token kinds the mask rule reads (``attention_masks``' ``token_type_ids``), for a
        run that resumes from a residual stream; None where the rule needs none."""
        return None

    def exact_suffix_start(self, token_type_ids: Tensor | None, position: int) -> int:
        """The first position from which recomputing a prompt's suffix is exact when queries
        from ``position`` on change: earlier positions must never attend to later ones. Plain
        causal attention: ``position`` itself; a bidirectional block containing it moves the
        start to the block's first position."""
        return position

    def rotary(self, cfg: LanguageConfig) -> Any:
        """The decoder's rotary tables: ``rotary(position_ids, dtype) -> (cos, sin)``, each
        ``[batch, pos, 1, d_head]`` (a batch of 1 broadcasts over the rows)."""
        return RotaryEmbedding(cfg.rope_inv_freq, cfg.rope_attention_scaling)

    def position_ids(
        self,
        cfg: MultimodalConfig,
        *,
        input_ids: Int[Tensor, "batch pos"] | None,
        attention_mask: Int[Tensor, "batch k_pos"],
        q_len: int,
        past_kv_cache: KeyValueCache | None = None,
        image_sizes: Tensor | None = None,
    ) -> Tensor:
        """Decoder position ids of the ``q_len`` new positions; 1D ``[batch, q_len]`` here.

        ``attention_mask`` covers the cached and the new positions (new ones last).

        ``input_ids`` is None when the run resumes from a residual stream (``start_at_layer``);
        a family whose positions depend on the tokens (M-RoPE) then needs explicit
        ``position_ids`` or the ones its cache recorded (``past_kv_cache.position_ids``).
        """
        return positions_from_mask(attention_mask)[:, -q_len:]

    # ------------------------------------------------------------- the processor's geometry
    def split_pixel_values(self, pixel_values: Tensor,
                           image_sizes: Tensor | None) -> list[Tensor]:
        """One prompt's processor ``pixel_values`` -> one tensor per image (images first)."""
        return list(pixel_values.split(1))

    def processor_sizes(self, model: Any, out: Any) -> Tensor | None:
        """One prompt's per-image geometry from the processor's outputs (its
        ``image_sizes_key``), what ``split_pixel_values`` and the forward read."""
        return out.get(self.image_sizes_key)

    def stack_pixel_values(self, pixel_values: Sequence[Tensor]) -> Tensor:
        """The per-image ``pixel_values`` (``split_pixel_values``) -> one batch tensor."""
        return torch.cat(list(pixel_values))

    def image_text(self, processor: Any, image: Any, image_token: str, n_image: int) -> str:
        """The text the processor puts in the prompt for one image, ``n_image`` image tokens
        (markers included, where the family's processor writes any)."""
        return image_token * n_image

    def stack_image_sizes(self, image_sizes: Sequence[Tensor]) -> Tensor:
        """The processor's per-example ``image_sizes_key`` outputs -> one batch tensor."""
        return torch.cat(list(image_sizes))

    def add_image_spans(self, model: Any, batch: Any) -> None:
        """Extra spans over the image tokens (e.g. ``image_newline``); none by default."""

    def preprocessing_mode(self, model: Any, mode: str | None) -> str:
        """The preprocessing that boxes are mapped through: ``mode`` checked, or the default.

        Families whose processor fixes the geometry (tiling, dynamic resolution) take any known
        mode; their ``image_layout`` follows the processor itself.
        """
        from mmlens.inputs.preprocessing import checked_mode

        return checked_mode(mode)

    def image_layout(self, model: Any) -> ImageLayout | None:
        """How the processor and the vision tower turn one image into image tokens: an
        ``ImageLayout`` of ``mmlens.inputs.layouts`` (``GridLayout`` a square crop with or
        without a class token, ``AnyresLayout`` base tile + tiles + newlines, ``MergedLayout``
        merged cells of a dynamic resolution), or a new module there. ``prepare`` builds every
        image's token map from it (``batch.token_maps``); the ``related`` / ``other`` spans,
        vision-tower spans, the pixel rule, example views and vision knockouts read the map.

        None by default: the family's image tokens have no map, so boxes, vision-tower spans
        and views are refused with an error naming this method; text spans still work.
        """
        return None
