"""One config object for a hooked LLaVA, read from a Hugging Face LLaVA / LLaVA-NeXT config.

The language half carries the TransformerLens field names (``n_layers``, ``d_model``, ``n_heads``,
``d_head``, ``d_mlp``, ``d_vocab``, ``normalization_type``) so that
``transformer_lens.ActivationCache`` helpers work on the model unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("llava", "llava_next")


@dataclass
class VisionConfig:
    """The CLIP or SigLIP vision tower. ``n_layers`` counts only the blocks the selected features
    need. SigLIP has no class token and a bias on its patch embedding."""

    d_model: int
    n_heads: int
    d_mlp: int
    n_layers: int
    image_size: int
    patch_size: int
    n_channels: int = 3
    eps: float = 1e-5
    act_fn: str = "quick_gelu"
    has_class_token: bool = True

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid_size**2


@dataclass
class LanguageConfig:
    """The Llama decoder, with TransformerLens field names.

    ``attention_bias`` puts biases on q/k/v and the output projection (Llama's flag);
    ``attn_qkv_bias`` puts them on q/k/v only, as Qwen2 does.
    """

    n_layers: int
    d_model: int
    n_heads: int
    n_key_value_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    eps: float
    rope_inv_freq: torch.Tensor
    rope_attention_scaling: float = 1.0
    attention_bias: bool = False
    attn_qkv_bias: bool = False
    mlp_bias: bool = False
    act_fn: str = "silu"
    normalization_type: str = "RMS"
    positional_embedding_type: str = "rotary"
    attn_only: bool = False
    final_rms: bool = True
    original_architecture: str = "LlamaForCausalLM"
    default_prepend_bos: bool = True
    device: Any = None


@dataclass
class MultimodalConfig:
    """Everything a ``HookedMultimodalTransformer`` needs; built by ``from_hf_config``.

    TransformerLens helpers read language fields (``cfg.n_layers``...) straight off this object.
    """

    model_type: str
    vision: VisionConfig
    text: LanguageConfig
    image_token_id: int
    feature_layers: list[int]
    feature_select_strategy: str
    projector_act: str = "gelu"
    projector_bias: bool = True
    image_grid_pinpoints: list[list[int]] | None = None
    anyres_max_tiles: int | None = None
    hf_config: Any = field(default=None, repr=False)

    def __getattr__(self, name: str) -> Any:
        # Language fields are read as cfg.n_layers, cfg.d_model... as in TransformerLens.
        if name.startswith("__") or name in ("text", "vision"):
            raise AttributeError(name)
        text = self.__dict__.get("text")
        if text is not None and hasattr(text, name):
            return getattr(text, name)
        raise AttributeError(f"MultimodalConfig has no field {name!r}")

    @property
    def is_anyres(self) -> bool:
        return self.model_type in ("llava_next", "llava_onevision")


def _rope_parameters(text_config: Any) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling exactly as the checkpoint's own rope settings."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(text_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        base = params.get("rope_theta", getattr(text_config, "rope_theta", 10000.0))
        dim = getattr(text_config, "head_dim", None) or (
            text_config.hidden_size // text_config.num_attention_heads
        )
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope type {rope_type!r} is not supported: use one of "
                         f"default, {', '.join(ROPE_INIT_FUNCTIONS)}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](text_config, device=torch.device("cpu"))
    return inv_freq.float(), float(scaling)


def resolve_feature_layers(feature_layer: int | list[int], n_vision_layers: int) -> list[int]:
    """Indices into the vision hidden states (0 = embeddings after the pre-norm, i = block i-1)."""
    layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    resolved = []
    for layer in layers:
        index = layer if layer >= 0 else n_vision_layers + 1 + layer
        if not 0 <= index <= n_vision_layers:
            raise ValueError(
                f"vision_feature_layer {layer} is outside the vision tower's "
                f"{n_vision_layers + 1} hidden states"
            )
        resolved.append(index)
    return resolved


def language_config_from_hf(tc: Any) -> LanguageConfig:
    """Read a Hugging Face ``LlamaConfig`` or ``Qwen2Config`` into a ``LanguageConfig``.

    Qwen2 always has q/k/v biases and no output bias (``attn_qkv_bias``); its sliding-window
    attention is not supported.
    """
    if tc.model_type not in ("llama", "qwen2"):
        raise ValueError(f"text model {tc.model_type!r} is not supported: mmlens supports llama "
                         "and qwen2 decoders")
    if getattr(tc, "use_sliding_window", False):
        raise ValueError("this Qwen2 text config uses sliding-window attention "
                         "(use_sliding_window=True), which mmlens does not support")
    inv_freq, scaling = _rope_parameters(tc)
    d_head = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return LanguageConfig(
        n_layers=tc.num_hidden_layers,
        d_model=tc.hidden_size,
        n_heads=tc.num_attention_heads,
        n_key_value_heads=tc.num_key_value_heads or tc.num_attention_heads,
        d_head=d_head,
        d_mlp=tc.intermediate_size,
        d_vocab=tc.vocab_size,
        eps=tc.rms_norm_eps,
        rope_inv_freq=inv_freq,
        rope_attention_scaling=scaling,
        attention_bias=bool(getattr(tc, "attention_bias", False)),
        attn_qkv_bias=tc.model_type == "qwen2",
        mlp_bias=bool(getattr(tc, "mlp_bias", False)),
        act_fn=tc.hidden_act,
        original_architecture=("Qwen2ForCausalLM" if tc.model_type == "qwen2"
                               else "LlamaForCausalLM"),
    )


def from_hf_config(hf_config: Any) -> MultimodalConfig:
    """Read a Hugging Face ``LlavaConfig`` / ``LlavaNextConfig`` into a ``MultimodalConfig``."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not a supported LLaVA checkpoint: mmlens supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (LLaVA-1.5 and LLaVA-NeXT with a CLIP vision "
            "tower and a Llama text model)"
        )
    vc, tc = hf_config.vision_config, hf_config.text_config
    if vc.model_type != "clip_vision_model":
        raise ValueError(f"vision tower {vc.model_type!r} is not supported: mmlens supports "
                         "clip_vision_model")
    if tc.model_type != "llama":
        raise ValueError(f"text model {tc.model_type!r} is not supported: mmlens supports llama "
                         "(Vicuna and Llama-3 text towers)")
    strategy = hf_config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy {strategy!r} is not supported: use "
                         "'default' or 'full'")
    feature_layers = resolve_feature_layers(hf_config.vision_feature_layer, vc.num_hidden_layers)
    text = language_config_from_hf(tc)
    vision = VisionConfig(
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
    return MultimodalConfig(
        model_type=model_type,
        vision=vision,
        text=text,
        image_token_id=hf_config.image_token_id,
        feature_layers=feature_layers,
        feature_select_strategy=strategy,
        projector_act=hf_config.projector_hidden_act,
        projector_bias=bool(getattr(hf_config, "multimodal_projector_bias", True)),
        image_grid_pinpoints=getattr(hf_config, "image_grid_pinpoints", None),
        hf_config=hf_config,
    )
