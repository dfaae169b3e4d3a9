"""One config object for a hooked multimodal model; each family reads it from its HF config.

The language half carries the TransformerLens field names (``n_layers``, ``d_model``, ``n_heads``,
``d_head``, ``d_mlp``, ``d_vocab``, ``normalization_type``) so that
``transformer_lens.ActivationCache`` helpers work on the model unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class VisionTowerConfig:
    """What every vision tower has: width, heads, MLP width and the blocks kept. Each family's
    config adds its own fields after these four (so their order, and with it ``repr`` and
    equality, is the family config's own)."""

    d_model: int
    n_heads: int
    d_mlp: int
    n_layers: int

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class SquarePatchConfig(VisionTowerConfig):
    """A tower cutting square ``image_size`` images (or tiles) into ``patch_size`` patches."""

    image_size: int
    patch_size: int

    @property
    def grid_size(self) -> int:
        """Patches per side of an image (or tile)."""
        return self.image_size // self.patch_size


@dataclass
class VisionConfig(SquarePatchConfig):
    """The CLIP or SigLIP vision tower. ``n_layers`` counts only the blocks the selected features
    need. SigLIP has no class token and a bias on its patch embedding."""

    n_channels: int = 3
    eps: float = 1e-5
    act_fn: str = "quick_gelu"
    has_class_token: bool = True

    @property
    def n_patches(self) -> int:
        return self.grid_size**2


@dataclass
class QwenVisionConfig(VisionTowerConfig):
    """The Qwen vision transformer. ``full_attention_layers`` None: every layer is full.

    ``window_size`` is in pixels of the resized image (Qwen2.5-VL: 112, i.e. 4x4 merged tokens).
    Qwen3-VL adds a bias on the patch embedding (``patch_bias``), a learned square table of
    ``n_position_embeddings`` positions resampled to each image's grid, and ``deepstack_layers``:
    the vision blocks whose outputs are merged and added into the first decoder layers.
    """

    d_out: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    n_channels: int = 3
    act_fn: str = "quick_gelu"
    gated_mlp: bool = False
    rms_norm: bool = False
    window_size: int | None = None
    full_attention_layers: tuple[int, ...] | None = None
    rope_theta: float = 10000.0
    eps: float = 1e-6
    patch_bias: bool = False
    n_position_embeddings: int | None = None
    deepstack_layers: tuple[int, ...] = ()

    @property
    def patch_dim(self) -> int:
        return self.n_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def token_size(self) -> int:
        """Side in pixels of the square of the resized image one merged token covers."""
        return self.patch_size * self.merge_size

    def is_windowed(self, layer: int) -> bool:
        return self.full_attention_layers is not None and layer not in self.full_attention_layers


@dataclass
class InternVisionConfig(SquarePatchConfig):
    """InternViT: ``n_layers`` counts the blocks the selected feature needs; ``final_norm``:
    the tower's last LayerNorm applies to the features (HF: ``use_mean_pooling=False`` with
    the last layer selected)."""

    n_channels: int = 3
    eps: float = 1e-6
    act_fn: str = "gelu"
    rms_norm: bool = False
    qkv_bias: bool = True
    final_norm: bool = False
    shuffle_scale: float = 0.5

    @property
    def grid(self) -> int:
        """Patches along a tile's side."""
        return self.grid_size

    @property
    def tokens_per_tile(self) -> int:
        return int(self.grid * self.shuffle_scale) ** 2


@dataclass
class ShuffleVisionConfig(SquarePatchConfig):
    """The Idefics3 vision tower: square ``image_size`` tiles of ``patch_size`` patches, every
    block kept, and the connector's ``scale_factor`` (patches folded per side into a token)."""

    scale_factor: int
    n_channels: int = 3
    eps: float = 1e-6
    act_fn: str = "gelu_pytorch_tanh"

    @property
    def tokens_per_side(self) -> int:
        """Image tokens per side of a tile, after the pixel shuffle."""
        return self.grid_size // self.scale_factor

    @property
    def tokens_per_tile(self) -> int:
        return self.tokens_per_side**2


@dataclass
class MllamaVisionConfig(VisionTowerConfig):
    """The Mllama vision encoder: ``n_layers`` local and ``n_global_layers`` gated global
    blocks; ``intermediate_layers`` (local block outputs) are concatenated to the output."""

    n_global_layers: int
    image_size: int
    patch_size: int
    max_tiles: int
    supported_aspect_ratios: tuple[tuple[int, int], ...]
    intermediate_layers: tuple[int, ...]
    n_channels: int = 3
    eps: float = 1e-5
    act_fn: str = "gelu"

    @property
    def n_tokens(self) -> int:
        """Rows per tile: the patches and the class token (HF's ``num_patches``)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def n_padded(self) -> int:
        return math.ceil(self.n_tokens / 8) * 8

    @property
    def d_out(self) -> int:
        return self.d_model * (1 + len(self.intermediate_layers))

    def n_tiles(self, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """Real tiles per image (0 for a padding image, id 0)."""
        counts = torch.tensor([0] + [w * h for w, h in self.supported_aspect_ratios],
                              device=aspect_ratio_ids.device)
        return counts[aspect_ratio_ids.long()]


@dataclass
class LanguageConfig:
    """The decoder (Llama-style blocks), with TransformerLens field names.

    ``qkv_bias`` / ``o_bias``: biases on the query/key/value and output projections (Llama:
    neither or both as ``attention_bias``; Qwen2: q/k/v only). ``rope_type`` names the rotary
    scheme the family builds (``"default"`` = 1D positions; ``"mrope"`` = Qwen-VL's 3D positions,
    ``mrope_section`` frequencies per axis, in blocks or, ``mrope_interleaved``, as Qwen3-VL's
    t, h, w, t, h, w... interleave). ``qk_norm``: an RMSNorm over each head's queries and keys
    before the rotary (Qwen3). ``deepstack_layers``: how many of the first blocks receive
    Qwen3-VL's DeepStack features (``blocks.{l}.hook_deepstack``). ``cross_attention_layers``:
    the blocks that attend to the image instead of the text (Llama-3.2-Vision's gated
    cross-attention); ``d_vocab_embed``: rows of the token embedding where it has more than
    the unembedding (None: ``d_vocab``).
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
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    rope_type: str = "default"
    mrope_section: tuple[int, ...] | None = None
    mrope_interleaved: bool = False
    qk_norm: bool = False
    deepstack_layers: int = 0
    cross_attention_layers: tuple[int, ...] = ()
    d_vocab_embed: int | None = None
    act_fn: str = "silu"
    normalization_type: str = "RMS"
    positional_embedding_type: str = "rotary"
    attn_only: bool = False
    final_rms: bool = True
    original_architecture: str = "LlamaForCausalLM"
    default_prepend_bos: bool = True
    device: Any = None
    n_ctx: int | None = None  # max_position_embeddings: the longest prompt the model takes


@dataclass
class MultimodalConfig:
    """Everything a ``HookedMultimodalTransformer`` needs; built by ``from_hf_config``.

    ``model_type`` is the Hugging Face model type; it names the family adapter
    (``mmlens.model.families.FAMILIES``) that builds and runs the model. TransformerLens helpers
    read language fields (``cfg.n_layers``, ``cfg.n_ctx``...) straight off this object.
    ``model_name`` (the name it was loaded by), ``dtype`` and ``device`` (of the token
    embedding; the first part's under a device map) are kept up to date by the model.
    """

    model_type: str
    vision: VisionTowerConfig  # the family's: VisionConfig, QwenVisionConfig, ...
    text: LanguageConfig
    image_token_id: int
    feature_layers: list[int]
    feature_select_strategy: str
    projector_act: str = "gelu"
    projector_bias: bool = True
    image_grid_pinpoints: list[list[int]] | None = None
    anyres_max_tiles: int | None = None
    hf_config: Any = field(default=None, repr=False)
    model_name: str = field(default="", repr=False)
    dtype: torch.dtype = field(default=torch.float32, repr=False)
    device: torch.device = field(default=torch.device("cpu"), repr=False)

    def __getattr__(self, name: str) -> Any:
        # Language fields are read as cfg.n_layers, cfg.d_model... as in TransformerLens.
        if name.startswith("__") or name in ("text", "vision"):
            raise AttributeError(name)
        text = self.__dict__.get("text")
        if text is not None and hasattr(text, name):
            return getattr(text, name)
        raise AttributeError(f"MultimodalConfig has no field {name!r}")


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


def language_config(tc: Any, **overrides: Any) -> LanguageConfig:
    """Read a Llama-style HF text config (Llama, Vicuna, Mistral-like, Qwen2) generically."""
    inv_freq, scaling = _rope_parameters(tc)
    d_head = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    attention_bias = bool(getattr(tc, "attention_bias", False))
    fields: dict[str, Any] = dict(
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
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(getattr(tc, "mlp_bias", False)),
        act_fn=tc.hidden_act,
        n_ctx=getattr(tc, "max_position_embeddings", None),
    )
    fields.update(overrides)
    return LanguageConfig(**fields)


def language_config_from_hf(tc: Any) -> LanguageConfig:
    """A Llama or Qwen2 text config read with each one's attention biases.

    Qwen2 always has q/k/v biases and no output bias; its sliding-window attention is not
    supported.
    """
    if tc.model_type not in ("llama", "qwen2"):
        raise ValueError(f"text model {tc.model_type!r} is not supported: mmlens supports llama "
                         "and qwen2 decoders")
    if tc.model_type == "llama":
        return language_config(tc)
    if getattr(tc, "use_sliding_window", False):
        raise ValueError("this Qwen2 text config uses sliding-window attention "
                         "(use_sliding_window=True), which mmlens does not support")
    return language_config(tc, qkv_bias=True, o_bias=False,
                           original_architecture="Qwen2ForCausalLM")
