"""PaliGemma and PaliGemma 2: a SigLIP tower, one linear projector, a Gemma (1) or Gemma 2
decoder, run as a prefix LM.

The image and the prompt (the prefix: ``token_type_ids == 0``, which is every token of a
prompt the processor builds without a ``suffix``) attend to each other both ways; the answer
(``token_type_ids == 1``, and every token decoded after the prompt) is causal. Gemma 2's
sliding layers cut causal attention to their window, the prefix block stays whole, as HF
composes them. Positions start at 1, as HF's. Gemma 2 soft-caps attention scores (the explicit
path, SDPA has no such step) and the final logits.

The HF module tree read here (``PaliGemmaForConditionalGeneration``, transformers >= 5)::

    model.vision_tower.{embeddings, encoder.layers.{i}, post_layernorm}  (SiglipVisionModel)
    model.multi_modal_projector.linear
    model.language_model                     (GemmaModel / Gemma2Model: families.gemma_text)
    lm_head                                  (tied to embed_tokens)

Prompts are HF's form ``<image> * n + <bos> + prompt + "\\n"`` (``templates.PALIGEMMA``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mmlens.core.errors import MMLensError
from mmlens.inputs.layouts.grid import GridLayout
from mmlens.inputs.processor import ComposedProcessor
from mmlens.model.components.projector import LinearProjector
from mmlens.model.config import MultimodalConfig
from mmlens.model.families.gemma3 import Gemma3Family, convert_siglip_post_norm, siglip_config
from mmlens.model.families.gemma_text import convert_gemma_language, gemma_masks, gemma_text_config
from mmlens.model.kv_cache import KeyValueCache
from mmlens.model.language import positions_from_mask
from mmlens.model.loading.convert import find_prefix, take
from mmlens.model.siglip import SiglipPostNormTower


def paligemma_processor(tokenizer: Any, image_processor: Any,
                        hf_config: Any) -> ComposedProcessor:
    """PaliGemma's processor from its parts: the tokenizer adds no BOS (the prompt puts it after
    the image), each ``<image>`` becomes ``num_image_tokens`` of them, and ``token_type_ids``
    are 0 over the whole prompt (the prefix), as HF's for a prompt without a suffix."""
    tokenizer.add_bos_token = False
    n_tokens = hf_config.text_config.num_image_tokens
    return ComposedProcessor(
        tokenizer, image_processor, count_image_tokens=lambda _: n_tokens, sizes_key=None,
        token_type_ids="prefix",
        image_token=tokenizer.convert_ids_to_tokens(hf_config.image_token_id))


class PaliGemmaFamily(Gemma3Family):
    name = "paligemma"
    model_types = ("paligemma",)
    hf_class = "PaliGemmaForConditionalGeneration"
    description = ("PaliGemma / PaliGemma 2 (SigLIP vision tower, linear projector, Gemma or "
                   "Gemma 2 decoder as a prefix LM)")
    checkpoints = ("google/paligemma-3b-pt-224", "google/paligemma2-3b-pt-224")
    min_transformers = "5.23"  # before it, HF's own PaliGemma gives other logits (5.22.2)
    prompt_template = "paligemma"

    def read_config(self, hf_config: Any) -> MultimodalConfig:
        vc, tc = hf_config.vision_config, hf_config.text_config
        if vc.model_type != "siglip_vision_model":
            raise MMLensError(f"vision tower {vc.model_type!r} is not supported for PaliGemma: "
                              "mmlens supports siglip_vision_model")
        if tc.model_type not in ("gemma", "gemma2"):
            raise MMLensError(f"text model {tc.model_type!r} is not supported for PaliGemma: "
                              "mmlens supports gemma and gemma2")
        vision = siglip_config(vc)
        return MultimodalConfig(
            model_type="paligemma", vision=vision, text=gemma_text_config(tc),
            image_token_id=hf_config.image_token_id, feature_layers=[vc.num_hidden_layers],
            feature_select_strategy="full", projector_act="none", projector_bias=True,
            hf_config=hf_config)

    def convert_state_dict(self, state: dict[str, Tensor],
                           cfg: MultimodalConfig) -> dict[str, Tensor]:
        vision = convert_siglip_post_norm(state, cfg)
        p = find_prefix(state, "model.multi_modal_projector.")
        projector = {"projector.weight": take(state, p + "linear.weight"),
                     "projector.bias": take(state, p + "linear.bias")}
        return {**vision, **projector, **convert_gemma_language(state, cfg)}

    def build_image_modules(self, cfg: MultimodalConfig) -> dict[str, nn.Module]:
        return {"vision": SiglipPostNormTower(cfg),
                "projector": LinearProjector(cfg.vision.d_model, cfg.text.d_model)}

    def image_layout(self, model: Any) -> GridLayout:
        """SigLIP's square, no class token: one image token a patch."""
        vision = model.cfg.vision
        return GridLayout(vision.image_size, vision.patch_size, class_token=False)

    def position_ids(self, cfg: MultimodalConfig, *, input_ids: Tensor | None,
                     attention_mask: Tensor, q_len: int,
                     past_kv_cache: KeyValueCache | None = None,
                     image_sizes: Tensor | None = None) -> Tensor:
        """1-based, skipping left padding (HF counts from 1)."""
        return positions_from_mask(attention_mask)[:, -q_len:] + 1

    def token_type_ids(self, cfg: MultimodalConfig, input_ids: Tensor) -> Tensor:
        """A prepared prompt is all prefix."""
        return torch.zeros_like(input_ids)

    def exact_suffix_start(self, token_type_ids: Tensor | None, position: int) -> int:
        """The whole prefix is one bidirectional block: a change inside it reaches all of it."""
        if token_type_ids is None:
            raise MMLensError("PaliGemma's suffix runs need the prompt's token_type_ids")
        return 0 if position < token_type_ids.shape[1] and not bool(
            token_type_ids[0, position]) else position

    def attention_masks(
        self, cfg: MultimodalConfig, *, attention_mask: Tensor, q_len: int,
        input_ids: Tensor | None, token_type_ids: Tensor | None = None,
        past_kv_cache: KeyValueCache | None = None,
    ) -> list[Tensor | None]:
        """Prefix bidirectional, answer causal, Gemma 2's window on the causal part. Without
        ``token_type_ids`` a whole prompt is prefix and a cached run's new tokens answer."""
        past = attention_mask.shape[1] - q_len
        if token_type_ids is not None:
            prefix = token_type_ids[:, -q_len:] == 0
        elif input_ids is not None:
            prefix = torch.full_like(input_ids, past == 0, dtype=torch.bool)
        elif past == 0:
            raise MMLensError(
                "PaliGemma's prefix attends both ways, so a run resuming from a residual stream "
                "needs token_type_ids= (0 over the prefix: image and prompt; 1 over an answer)")
        else:
            prefix = None
        bidirectional = None
        if prefix is not None and bool(prefix.any()):
            if past:
                raise MMLensError("prefix tokens among the new positions of a cached run: the "
                                  "prefix attends both ways, so run it in one pass")
            bidirectional = prefix[:, :, None] & prefix[:, None, :]
        return gemma_masks(cfg.text, attention_mask, q_len, bidirectional,  # type: ignore[arg-type]
                           window_cuts_bidirectional=False)

    def final_logits(self, logits: Tensor, cfg: MultimodalConfig) -> Tensor:
        cap = getattr(cfg.text, "final_softcap", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def load_processor(self, path: str, **kwargs: Any) -> Any:
        """Composed from the checkpoint's tokenizer and PIL SigLIP image processor (no
        torchvision); the tokenizer adds no BOS (the prompt puts it after the image)."""
        from transformers import AutoConfig, AutoTokenizer
        from transformers.models.siglip.image_processing_pil_siglip import (
            SiglipImageProcessorPil,
        )

        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            image_processor = SiglipImageProcessorPil.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise MMLensError(f"{path} has no usable tokenizer or image processor ({error}); a "
                              "PaliGemma checkpoint needs its tokenizer files and "
                              "preprocessor_config.json") from error
        return paligemma_processor(tokenizer, image_processor, AutoConfig.from_pretrained(path))
