"""HookedMultimodalTransformer: a vision tower, connector and decoder with hooks.

    pixel_values ─▶ vision.* ─▶ projector.hook_in ─▶ projector.hook_out (image features)
    input_ids ─▶ hook_token_embed ──┴─ merge at image tokens ─▶ hook_embed
        ─▶ blocks.{l}.hook_resid_pre ─▶ ... ─▶ blocks.{l}.hook_resid_post ─▶ ln_final ─▶ logits

The model's family (``mmlens.model.families``, looked up by ``cfg.model_type``) builds the
image-side modules and decides how images are encoded and merged and how decoder positions
are computed; this class composes them and owns the hooks, caches and running.

``hook_embed`` is the merged embedding, i.e. what the embedding contributes to the residual
stream, so TransformerLens's ``decompose_resid`` / ``accumulated_resid`` add up (on Qwen3-VL,
``decompose_resid`` plus the ``blocks.{l}.hook_deepstack`` additions).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int, Shaped
from torch import Tensor
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from mmlens.inputs.batch import MultimodalBatch
from mmlens.model.components import Unembed
from mmlens.model.config import MultimodalConfig
from mmlens.model.door import (
    check_input_ids,
    check_resume,
    forward_inputs,
    full_attention_mask,
    generate_inputs,
)
from mmlens.model.families import family_for
from mmlens.model.hook_names import CheckedHooks
from mmlens.model.kv_cache import KeyValueCache
from mmlens.model.language import LanguageStack
from mmlens.model.tl_api import TransformerLensAPI, check_pretrained_kwargs, language_model_loss


class HookedMultimodalTransformer(TransformerLensAPI, CheckedHooks, HookedRootModule):
    """A multimodal model (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, ...) whose every
    activation is a named, editable hook point.

    Build it with ``from_pretrained`` (hub name, local folder or bundled short name such as
    ``"shapes-llava"``) or ``from_hf_model``; prepare inputs with ``prepare``.
    """

    def __init__(self, cfg: MultimodalConfig, processor: Any = None):
        super().__init__()
        self.cfg = cfg
        self.processor = processor
        self.family = family_for(cfg.model_type)
        # Registered in data-flow order (vision, connector...), the order of the hook names.
        for name, module in self.family.build_image_modules(cfg).items():
            self.add_module(name, module)
        self.embed = self.family.build_embed(cfg.text)
        self.hook_token_embed = HookPoint()  # [batch, pos, d_model], before the merge
        self.hook_embed = HookPoint()  # [batch, pos, d_model], image features merged in
        self.blocks = self.family.build_blocks(cfg.text)
        self.language = LanguageStack(cfg.text, self.blocks, self.family.rotary(cfg.text))
        self.ln_final = self.family.build_final_norm(cfg.text)
        self.unembed = Unembed(cfg.text.d_model, cfg.text.d_vocab)
        self._bound_images: dict[str, Any] | None = None
        self.device_map: dict[str, str] | None = None  # set by place()
        self.setup()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype: torch.dtype | str | None = None,
                        device: str | torch.device | None = None,
                        device_map: str | dict[str, Any] | None = None,
                        **kwargs: Any) -> HookedMultimodalTransformer:
        """Load a checkpoint of a supported family (``mmlens.model.families.FAMILIES``): a hub
        name, a local folder or a bundled name. ``device_map`` (``"auto"`` or e.g.
        ``{"vision": "cuda:0", "blocks.0-15": "cuda:0", "blocks.16-31": "cuda:1"}``) splits
        the model across devices; see ``place``."""
        from mmlens.model.loading import load_pretrained

        if device is not None and device_map is not None:
            raise ValueError("pass device or device_map, not both")
        check_pretrained_kwargs(kwargs)
        model = load_pretrained(cls, name_or_path, dtype=dtype, device=device, **kwargs)
        return model if device_map is None else model.place(device_map)

    def place(self, device_map: str | dict[str, Any]) -> HookedMultimodalTransformer:
        """Put the parts of the model on the devices of ``device_map`` (see
        ``mmlens.model.devices``): activations move to each part's device as they enter it,
        so every hook stays on the data path. Returns the model."""
        from mmlens.model.devices import dispatch

        dispatch(self, device_map)
        self.sync_cfg_placement()
        return self

    @classmethod
    def from_hf_model(cls, hf_model: Any, processor: Any = None) -> HookedMultimodalTransformer:
        """Convert an in-memory HF model of a supported family (e.g.
        ``LlavaForConditionalGeneration``)."""
        from mmlens.model.loading import convert_hf_model

        return convert_hf_model(cls, hf_model, processor)

    # ----------------------------------------------------------------- running
    def forward(
        self,
        input: Int[Tensor, "batch pos"] | MultimodalBatch | Float[Tensor, "batch pos d_model"]
        | str | list[str] | None = None,
        pixel_values: Float[Tensor, "images *tiles channels height width"]
        | Float[Tensor, "*patch_images n_patches patch_dim"] | None = None,
        *,
        attention_mask: Shaped[Tensor, "batch pos"] | None = None,
        position_ids: Tensor | None = None,
        image_sizes: Int[Tensor, "n_images _"] | Shaped[Tensor, "*frames mask_h mask_w"]
        | None = None,
        return_type: str | None = "logits",
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        past_kv_cache: KeyValueCache | None = None,
        tokens: Int[Tensor, "batch pos"] | None = None,
        loss_per_token: bool = False,
        token_type_ids: Int[Tensor, "batch pos"] | None = None,
        injections: dict[int, Tensor] | None = None,
        **processor_outputs: Any,
    ) -> Tensor | tuple[Tensor, Tensor] | None:
        """Run the model.

        ``input`` is ``input_ids [batch, pos]``, a ``MultimodalBatch`` from ``prepare``, text
        (a string or list of strings, tokenized with BOS; no image), or, with
        ``start_at_layer``, the residual stream ``[batch, pos, d_model]`` entering that layer.
        ``return_type``: ``"logits"`` ``[batch, pos, d_vocab]``, ``"loss"`` (mean next-token
        cross-entropy over text targets, image and padding excluded; ``loss_per_token`` gives
        ``[batch, pos - 1]``), ``"both"`` (logits, loss) or None. With ``start_at_layer`` the
        loss needs ``tokens=``. ``stop_at_layer`` returns the residual stream entering it.
        ``position_ids`` default to the family's (``position_ids``); a ``past_kv_cache`` records
        them. ``token_type_ids`` (the processor's token kinds: 1 = image token for Gemma 3, 1 =
        answer for PaliGemma) tell a family whose mask depends on the token kinds where its
        bidirectional blocks are; needed when the run resumes from a residual stream.
        ``injections`` (only with ``start_at_layer``): ``{layer: [batch, pos, d_model]}`` added
        to those blocks' outputs, the ``blocks.{l}.hook_deepstack`` activations of the run being
        resumed (``{}`` for none); required when resuming before a DeepStack layer.

        A processor's outputs go in under HF's names: ``model(**processor(images=...,
        text=...))`` (``input_ids``, ``pixel_values`` in the processor's layout,
        ``attention_mask`` and the family's geometry key, e.g. Qwen's ``image_grid_thw``;
        ``token_type_ids`` for a family that reads them, ``Family.processor_keys``;
        ``mm_token_type_ids`` / ``batch_num_images`` are checked, not needed). Any other
        keyword raises, listing the accepted names.
        """
        input, pixel_values, attention_mask, image_sizes = forward_inputs(
            self, input, pixel_values=pixel_values, attention_mask=attention_mask,
            image_sizes=image_sizes, token_type_ids=token_type_ids,
            processor_outputs=processor_outputs)
        input_ids = None
        if start_at_layer is None:
            check_input_ids(input, injections)
            if self._bound_images is not None and pixel_values is None:
                pixel_values = self._bound_images["pixel_values"]
                image_sizes = self._bound_images.get("image_sizes")
            input_ids = input
            resid, injections, cross = self._embed(input, pixel_values, image_sizes)
        else:
            resid, cross = input, None
            check_resume(self.cfg, start_at_layer, stop_at_layer, past_kv_cache, injections)
        q_len = resid.shape[1]
        attention_mask = full_attention_mask(attention_mask, resid, past_kv_cache)
        if position_ids is None:
            position_ids = self.family.position_ids(
                self.cfg, input_ids=input_ids, attention_mask=attention_mask, q_len=q_len,
                past_kv_cache=past_kv_cache, image_sizes=image_sizes)
        if past_kv_cache is not None:
            past_kv_cache.record_positions(position_ids)
        masks = self.family.attention_masks(
            self.cfg, attention_mask=attention_mask, q_len=q_len, input_ids=input_ids,
            token_type_ids=token_type_ids, past_kv_cache=past_kv_cache)
        resid = self.language(
            resid, attention_mask=attention_mask, position_ids=position_ids,
            start_at_layer=start_at_layer or 0, stop_at_layer=stop_at_layer,
            past_kv_cache=past_kv_cache, masks=masks, injections=injections, cross=cross,
        )
        if stop_at_layer is not None:
            return resid
        if return_type is None:
            return None
        if return_type not in ("logits", "loss", "both"):
            raise ValueError(f"return_type {return_type!r} is not supported: use 'logits', "
                             "'loss', 'both' or None")
        logits = self.family.final_logits(self.unembed(self.ln_final(resid)), self.cfg)
        if return_type == "logits":
            return logits
        if tokens is None and start_at_layer is None:
            tokens = input
        if tokens is None:
            raise ValueError(f"return_type={return_type!r} with start_at_layer needs tokens= "
                             "(the input ids whose next tokens the loss predicts)")
        loss = language_model_loss(logits, tokens, attention_mask, self.cfg.image_token_id,
                                   per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    def encode_images(
        self, pixel_values: Tensor, image_sizes: Tensor | None = None
    ) -> Float[Tensor, "n_image_tokens d_model"]:
        """Image features in text width, one row per image token, in input order.

        The layout is the family's: LLaVA-1.5 takes ``[images, 3, H, W]``, LLaVA-NeXT
        ``[images, tiles, 3, H, W]`` with ``image_sizes [images, 2]``, Qwen-VL flattened patches
        ``[n_patches, 3*2*14*14]`` (or ``prepare``'s ``[images, max_patches, ...]``) with
        ``image_sizes`` the processor's ``image_grid_thw [images, 3]``.
        """
        return self.family.encode_images(self, pixel_values, image_sizes)

    def embed_inputs(
        self,
        input_ids: Int[Tensor, "batch pos"],
        pixel_values: Tensor | None = None,
        *,
        image_sizes: Tensor | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Token embeddings with the image features merged in at the image-token positions."""
        return self._embed(input_ids, pixel_values, image_sizes)[0]

    def _embed(
        self, input_ids: Tensor, pixel_values: Tensor | None, image_sizes: Tensor | None
    ) -> tuple[Tensor, dict[int, Tensor] | None, Any]:
        """``embed_inputs``, the features the family adds after decoder layers
        (``{layer: [batch, pos, d_model]}``, zero off the image tokens) or None, and what its
        cross-attention layers attend to (``Family.cross_attention``) or None."""
        embeds = self.hook_token_embed(self.embed(input_ids))
        features, injections, cross = None, None, None
        if pixel_values is not None:
            features, per_layer = self.family.encode_image_layers(
                self, pixel_values.to(input_ids.device), image_sizes)
            injections = {layer: self.family.merge(input_ids, torch.zeros_like(embeds), added,
                                                   self.cfg)
                          for layer, added in per_layer.items()} or None
            cross = self.family.cross_attention(self, input_ids, features, image_sizes)
        merged = self.hook_embed(self.family.merge(input_ids, embeds, features, self.cfg))
        return merged, injections, cross

    def position_ids(
        self, input_ids: Int[Tensor, "batch pos"], attention_mask: Tensor | None = None, *,
        image_sizes: Tensor | None = None,
    ) -> Tensor:
        """The decoder positions of a prompt, as ``forward`` computes them (the family's rule:
        ``[batch, pos]`` for 1D rotary)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.family.position_ids(
            self.cfg, input_ids=input_ids, attention_mask=attention_mask,
            q_len=input_ids.shape[1], image_sizes=image_sizes)

    @contextlib.contextmanager
    def bind_images(
        self, pixel_values: Tensor, image_sizes: Tensor | None = None
    ) -> Iterator[None]:
        """Within the block, calls that pass only ``input_ids`` use these images.

        This is how functions that call ``model(tokens)`` or ``run_with_hooks(tokens, ...)``
        (TransformerLens's ``patching``) run on a multimodal prompt.
        """
        previous = self._bound_images
        self._bound_images = {"pixel_values": pixel_values, "image_sizes": image_sizes}
        try:
            yield
        finally:
            self._bound_images = previous

    def saes(self, saes: Any, use_error_term: bool = True) -> Any:
        """Context manager splicing sparse autoencoders into their hooks
        (``mmlens.methods.saes``; each SAE names its hook). With ``use_error_term`` the
        outputs are unchanged; ``"{hook}.hook_sae_acts_post"`` and the SAE's other hook points
        are in ``hook_dict`` inside the block. See ``mmlens.model.splice``."""
        from mmlens.model.splice import splice

        return splice(self, [saes] if isinstance(saes, torch.nn.Module) else saes,
                      use_error_term=use_error_term)

    # ----------------------------------------------------------------- helpers
    def prepare(self, images: Any, questions: Any, *, template: Any = None,
                boxes: Sequence[Sequence[tuple[float, float, float, float]]] | None = None,
                examples: Sequence[Any] | None = None, preprocessing: str | None = None,
                tokenization: str = "whole", related_rule: str = "geometry") -> MultimodalBatch:
        """Prompts, pixel values and named position spans for images and questions: one entry
        of ``images`` per question (an image, a list of several, or None for text only); see
        ``mmlens.inputs.prepare.prepare`` for the options."""
        from mmlens.inputs.prepare import prepare

        return prepare(self, images, questions, template=template, boxes=boxes,
                       examples=examples, preprocessing=preprocessing,
                       tokenization=tokenization, related_rule=related_rule)

    def generate(self, input: Any = None, pixel_values: Tensor | None = None,
                 **kwargs: Any) -> Any:
        """Greedy or sampled continuation with images, a key/value cache and active hooks;
        see ``mmlens.model.generation.generate``. A processor's outputs go in under HF's names,
        as in ``forward``: ``model.generate(**processor(...), max_new_tokens=5)``."""
        from mmlens.model.generation import generate

        input = generate_inputs(self, input, pixel_values, kwargs)
        return generate(self, input, pixel_values, **kwargs)
