"""Sparse autoencoders in SAELens's format, spliced into any hook, the vision tower included.

    sae = load_sae("path/to/sae_folder")             # cfg.json + sae_weights.safetensors
    with model.saes([sae], use_error_term=True):      # outputs unchanged with the error term
        logits, cache = model.run_with_cache(batch)
    acts = cache[f"{sae.hook_name}.hook_sae_acts_post"]   # [batch, pos, d_sae]

SAELens 6 defines, for ``x`` at the hook (``process_sae_in``, ``encode``, ``decode``)::

    sae_in = x - b_dec * apply_b_dec_to_input
    pre    = sae_in @ W_enc + b_enc                                   # [..., d_sae]
    acts   = relu(pre)                       (standard)
           = relu(pre) * (pre > threshold)   (jumprelu)
           = relu(top-k values of pre) at their indices, 0 elsewhere   (topk)
    recons = acts @ W_dec + b_dec                                     # [..., d_in]
    out    = recons + (x - recons_without_hooks)   with the error term, else recons

The error term is computed from the unedited path, so a hook on ``hook_sae_acts_post`` that
ablates, patches or steers features changes ``out`` by exactly the decoder's image of the
edit, and the change flows on through the model. Weights are read with safetensors only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from mmlens.core.errors import MMLensError, MMLensFileNotFoundError

ARCHITECTURES = ("standard", "jumprelu", "topk")
WEIGHTS = "sae_weights.safetensors"
CONFIG = "cfg.json"


class SAE(nn.Module):
    """A sparse autoencoder ``d_in -> d_sae -> d_in`` (equations in the module docstring),
    with SAELens's hook points in data order."""

    def __init__(self, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, *,
                 architecture: str = "standard", hook_name: str | None = None,
                 apply_b_dec_to_input: bool = True, threshold: Tensor | None = None,
                 k: int | None = None):
        super().__init__()
        _check_weights(W_enc, b_enc, W_dec, b_dec, architecture, threshold, k)
        self.W_enc = nn.Parameter(W_enc)  # [d_in, d_sae]
        self.b_enc = nn.Parameter(b_enc)  # [d_sae]
        self.W_dec = nn.Parameter(W_dec)  # [d_sae, d_in]
        self.b_dec = nn.Parameter(b_dec)  # [d_in]
        self.threshold = None if threshold is None else nn.Parameter(threshold)  # [d_sae]
        self.architecture, self.hook_name, self.k = architecture, hook_name, k
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.use_error_term = False
        self.hook_sae_input = HookPoint()  # [..., d_in]
        self.hook_sae_acts_pre = HookPoint()  # [..., d_sae]
        self.hook_sae_acts_post = HookPoint()  # [..., d_sae]
        self.hook_sae_recons = HookPoint()  # [..., d_in]
        self.hook_sae_error = HookPoint()  # [..., d_in]
        self.hook_sae_output = HookPoint()  # [..., d_in]

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Feature activations, through ``hook_sae_input``, ``_acts_pre`` and ``_acts_post``."""
        x = self.hook_sae_input(self._check_width(x).to(self.W_enc.dtype))
        pre = self.hook_sae_acts_pre(self._pre(x))
        return self.hook_sae_acts_post(self._activation(pre))

    def decode(self, acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        """The reconstruction ``acts @ W_dec + b_dec``, through ``hook_sae_recons``."""
        return self.hook_sae_recons(acts @ self.W_dec + self.b_dec)

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        out = self.decode(self.encode(x))
        if self.use_error_term:
            with torch.no_grad():  # the unedited reconstruction, hooks left out (as SAELens)
                clean = self._activation(self._pre(x.to(self.W_enc.dtype))) @ self.W_dec
                error = self.hook_sae_error(x.to(out.dtype) - (clean + self.b_dec))
            out = out + error
        return self.hook_sae_output(out).to(x.dtype)

    def _pre(self, x: Tensor) -> Tensor:
        return (x - self.b_dec * self.apply_b_dec_to_input) @ self.W_enc + self.b_enc

    def _activation(self, pre: Tensor) -> Tensor:
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        if self.architecture == "topk":
            top = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return torch.relu(pre)

    def _check_width(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.d_in:
            where = f" at {self.hook_name}" if self.hook_name else ""
            raise MMLensError(f"the SAE reads vectors of d_in={self.d_in} but the activation"
                              f"{where} has width {x.shape[-1]} ({tuple(x.shape)}): splice it "
                              "at the hook it was trained on (its cfg.json's hook_name)")
        if x.device != self.W_enc.device:
            raise MMLensError(f"the SAE is on {self.W_enc.device} but the activation at "
                              f"{self.hook_name} is on {x.device}: load it there "
                              "(load_sae(path, device=...)) or move it with sae.to(device)")
        return x

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        return (f"{self.architecture}, d_in={self.d_in}, d_sae={self.d_sae}{k}, "
                f"hook_name={self.hook_name!r}")


def _check_weights(W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor,
                   architecture: str, threshold: Tensor | None, k: int | None) -> None:
    if architecture not in ARCHITECTURES:
        raise MMLensError(f"unknown SAE architecture {architecture!r}: mmlens reads "
                          f"{', '.join(ARCHITECTURES)}")
    if W_enc.ndim != 2:
        raise MMLensError(f"W_enc must be [d_in, d_sae], got {tuple(W_enc.shape)}")
    d_in, d_sae = W_enc.shape
    expected = {"b_enc": (b_enc, (d_sae,)), "W_dec": (W_dec, (d_sae, d_in)),
                "b_dec": (b_dec, (d_in,))}
    if architecture == "jumprelu":
        if threshold is None:
            raise MMLensError("a jumprelu SAE needs its threshold tensor [d_sae]; the weights "
                              "have none")
        expected["threshold"] = (threshold, (d_sae,))
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise MMLensError(f"{name} has shape {tuple(tensor.shape)} but W_enc "
                              f"[{d_in}, {d_sae}] needs {list(shape)}: the weights do not "
                              "belong together")
    if architecture == "topk" and (not isinstance(k, int) or not 0 < k <= d_sae):
        raise MMLensError(f"a topk SAE needs k between 1 and d_sae={d_sae}, got {k!r}")


def load_sae(path: str | Path, *, hook_name: str | None = None,
             architecture: str | None = None, apply_b_dec_to_input: bool | None = None,
             k: int | None = None, device: str | torch.device | None = None,
             dtype: torch.dtype | None = None) -> SAE:
    """An SAE from SAELens's saved folder (``cfg.json`` + ``sae_weights.safetensors``) or from
    a safetensors file of the same tensors (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``,
    ``threshold`` for JumpReLU) with the settings as arguments.

    Arguments given override the folder's config. A file's defaults: ``architecture``
    ``"jumprelu"`` when it holds a threshold, else ``"standard"``; ``apply_b_dec_to_input``
    True (SAELens's default). Only ``normalize_activations="none"`` is read: the others
    rescale with statistics outside the weights, and are refused.
    """
    path = Path(path)
    config: dict[str, Any] = {}
    weights_path = path
    if path.is_dir():
        if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
            raise MMLensFileNotFoundError(f"{path} is not an SAELens folder: it needs {CONFIG} "
                                          f"and {WEIGHTS}")
        config = _read_config(path / CONFIG)
        weights_path = path / WEIGHTS
    elif not path.is_file():
        raise MMLensFileNotFoundError(f"no SAE at {path}: give an SAELens folder or a "
                                      ".safetensors file")
    tensors = _read_weights(weights_path)
    architecture = architecture or _architecture(config, tensors)
    if k is None and architecture == "topk":
        k = config.get("k", (config.get("activation_fn_kwargs") or {}).get("k"))
    if apply_b_dec_to_input is None:
        apply_b_dec_to_input = config.get("apply_b_dec_to_input", True)
    hook_name = hook_name or (config.get("metadata") or {}).get("hook_name") or config.get(
        "hook_name")
    for key in ("d_in", "d_sae"):
        axis = 0 if key == "d_in" else 1
        if key in config and config[key] != tensors["W_enc"].shape[axis]:
            raise MMLensError(f"{CONFIG} says {key}={config[key]} but W_enc is "
                              f"{list(tensors['W_enc'].shape)} ([d_in, d_sae]): the config "
                              "and the weights do not belong together")
    sae = SAE(tensors["W_enc"], tensors["b_enc"], tensors["W_dec"], tensors["b_dec"],
              architecture=architecture, hook_name=hook_name,
              apply_b_dec_to_input=apply_b_dec_to_input, threshold=tensors.get("threshold"),
              k=k)
    return sae.to(device=device, dtype=dtype).eval()


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MMLensError(f"{path} is not valid JSON ({err}): is the folder complete?") from err
    normalize = config.get("normalize_activations") or "none"
    if normalize != "none":
        raise MMLensError(f"{path}: normalize_activations={normalize!r} rescales activations by "
                          "a statistic that is not in the weights; mmlens reads SAEs saved with "
                          "'none' (fold the scaling into the weights first)")
    if config.get("finetuning_scaling_factor"):
        raise MMLensError(f"{path}: finetuning_scaling_factor is set; mmlens reads SAEs "
                          "without it")
    reshape = config.get("reshape_activations") or "none"
    if reshape != "none":
        raise MMLensError(f"{path}: reshape_activations={reshape!r} (per-head hook_z SAEs) is "
                          "not read yet: flatten the heads yourself")
    return config


REQUIRED = ("W_enc", "b_enc", "W_dec", "b_dec")


def _read_weights(path: Path) -> dict[str, Tensor]:
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise MMLensError(f"cannot read {path} as safetensors ({err}): SAE weights are read "
                          "from .safetensors only") from err
    missing = [name for name in REQUIRED if name not in tensors]
    if missing:
        raise MMLensError(f"{path} has no {', '.join(missing)}: an SAE needs "
                          f"{', '.join(REQUIRED)} (and threshold for JumpReLU); it holds "
                          f"{', '.join(sorted(tensors)) or 'nothing'}")
    unknown = sorted(set(tensors) - {*REQUIRED, "threshold"})
    if unknown:
        raise MMLensError(f"{path} holds tensors mmlens does not know ({', '.join(unknown)}): "
                          "it reads W_enc, b_enc, W_dec, b_dec and threshold only")
    return tensors


def _architecture(config: dict[str, Any], tensors: dict[str, Tensor]) -> str:
    if "architecture" in config:
        architecture = config["architecture"]
        activation = config.get("activation_fn_str") or config.get("activation_fn") or "relu"
        if architecture == "standard" and activation == "topk":
            return "topk"  # older saves: a standard SAE with a top-k activation
        if architecture == "standard" and activation != "relu":
            raise MMLensError(f"activation_fn {activation!r} is not read: mmlens reads relu "
                              "and topk standard SAEs")
        return architecture
    return "jumprelu" if "threshold" in tensors else "standard"
