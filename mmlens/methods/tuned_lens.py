"""Tuned lens (Belrose et al. 2023): a learned affine translator per layer before the unembedding.

The logit lens reads layer ``l``'s residual ``h`` as ``unembed(ln_final(h))``; the tuned lens
reads ``unembed(ln_final(h + A_l h + b_l))``, with ``A_l``, ``b_l`` trained on the model's own
activations to minimise ``KL(final distribution || lens distribution)`` at every position.
They start at zero, so an untrained lens is exactly the logit lens. Layers are the logit
lens's: ``-1`` (the embedding) and ``0..L-1`` (after each block).

    lens = train_tuned_lens(model, batches, steps=300)
    lens.save("lenses/shapes-llava")                 # tuned_lens.safetensors + tuned_lens.json
    lens = load_tuned_lens("lenses/shapes-llava", model)
    token_probabilities(model, cache, tokens, tuned=lens)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save, save_file
from torch import Tensor, nn

from mmlens.core.errors import MMLensError, MMLensFileNotFoundError
from mmlens.inputs.batch import MultimodalBatch
from mmlens.model.protocol import HookedModel

WEIGHTS = "tuned_lens.safetensors"
METADATA = "tuned_lens.json"


class TunedLens(nn.Module):
    """Per-layer translators ``h -> h + h A_l^T + b_l`` (``weight`` ``[L + 1, d, d]``, ``bias``
    ``[L + 1, d]``; index ``layer + 1``). ``metadata``: model name, ``d_model``, ``n_layers``
    and the training settings."""

    def __init__(self, n_layers: int, d_model: int, metadata: dict[str, Any] | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_layers + 1, d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(n_layers + 1, d_model))
        self.metadata = {"n_layers": n_layers, "d_model": d_model, **(metadata or {})}
        self.file_digest: str | None = None  # set by load_tuned_lens

    @property
    def digest(self) -> str:
        """sha256 (16 hex digits) of the lens's two files: as read by ``load_tuned_lens``, else
        as ``save`` would write them. What a study's signature and run.json record."""
        if self.file_digest is not None:
            return self.file_digest
        return _files_digest(save(self._tensors()), self._metadata_text().encode())

    def _tensors(self) -> dict[str, Tensor]:
        return {"weight": self.weight.detach().cpu().contiguous(),
                "bias": self.bias.detach().cpu().contiguous()}

    def _metadata_text(self) -> str:
        return json.dumps(self.metadata, indent=1, sort_keys=True)

    def translate(self, resid: Float[Tensor, "... d_model"], layer: int) -> Tensor:
        """Layer ``layer``'s residual (``-1``: the embedding) moved towards the final layer."""
        n_layers = self.metadata["n_layers"]
        if not -1 <= layer < n_layers:
            raise MMLensError(f"layer {layer} has no translator: this lens covers "
                              f"-1..{n_layers - 1}")
        weight = self.weight[layer + 1].to(resid)
        return resid + resid @ weight.T + self.bias[layer + 1].to(resid)

    def save(self, folder: str | Path) -> Path:
        """Write ``tuned_lens.safetensors`` and ``tuned_lens.json`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self._tensors(), str(folder / WEIGHTS))
        (folder / METADATA).write_text(self._metadata_text())
        return folder


def _files_digest(weights: bytes, metadata: bytes) -> str:
    return hashlib.sha256(hashlib.sha256(weights).digest()
                          + hashlib.sha256(metadata).digest()).hexdigest()[:16]


def model_name(model: HookedModel) -> str:
    """The name a lens is saved under: the checkpoint's name (a local folder's last part, so
    the same checkpoint elsewhere matches), else the model type."""
    name = str(getattr(model.cfg.hf_config, "_name_or_path", "") or model.cfg.model_type)
    return Path(name).name if Path(name).is_absolute() else name


def load_tuned_lens(folder: str | Path, model: HookedModel) -> TunedLens:
    """A lens saved by ``TunedLens.save``, refused unless it was trained for ``model`` (name,
    ``d_model``, ``n_layers``) and its tensors have the shapes its metadata gives."""
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / METADATA).is_file():
        raise MMLensFileNotFoundError(f"{folder} is not a saved tuned lens: it needs {WEIGHTS} "
                                      f"and {METADATA} (TunedLens.save writes both)")
    try:
        metadata = json.loads((folder / METADATA).read_text())
    except json.JSONDecodeError as err:
        raise MMLensError(f"{folder / METADATA} is not valid JSON ({err})") from err
    expected = {"model": model_name(model), "d_model": model.cfg.d_model,
                "n_layers": model.cfg.n_layers}
    wrong = {key: metadata.get(key) for key, value in expected.items()
             if metadata.get(key) != value}
    if wrong:
        raise MMLensError(f"{folder} was trained for {wrong} but this model has "
                          f"{ {key: expected[key] for key in wrong} }: train a lens for this "
                          "model (train_tuned_lens)")
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except Exception as err:  # safetensors raises its own error types
        raise MMLensError(f"cannot read {folder / WEIGHTS} as safetensors ({err})") from err
    n, d = expected["n_layers"], expected["d_model"]
    shapes = {"weight": (n + 1, d, d), "bias": (n + 1, d)}
    bad = {name: tuple(tensors[name].shape) if name in tensors else None
           for name, shape in shapes.items()
           if name not in tensors or tuple(tensors[name].shape) != shape}
    if bad or set(tensors) != set(shapes):
        raise MMLensError(f"{folder / WEIGHTS} holds {sorted(tensors)} with shapes {bad} but a "
                          f"lens for this model needs weight {shapes['weight']} and bias "
                          f"{shapes['bias']} only")
    if not all(bool(t.isfinite().all()) for t in tensors.values()):
        raise MMLensError(f"{folder / WEIGHTS} holds NaN or infinite values: retrain the lens")
    lens = TunedLens(n, d, metadata)
    with torch.no_grad():
        lens.weight.copy_(tensors["weight"])
        lens.bias.copy_(tensors["bias"])
    lens.file_digest = _files_digest((folder / WEIGHTS).read_bytes(),
                                     (folder / METADATA).read_bytes())
    return lens


def lens_activations(model: HookedModel, batches: Iterable[MultimodalBatch]
                     ) -> tuple[Float[Tensor, "layer item d_model"], Float[Tensor, "item d_vocab"]]:
    """Residuals after every layer (``-1..L-1``) at every real position of ``batches``, and
    the model's final log-probabilities there."""
    names = ["hook_embed"] + [f"blocks.{layer}.hook_resid_post"
                              for layer in range(model.cfg.n_layers)]
    stacks, targets = [], []
    for batch in batches:
        with torch.no_grad():
            logits, cache = model.run_with_cache(batch, names_filter=names.__contains__)
        real = batch.attention_mask.bool().to(logits.device)
        stacks.append(torch.stack([cache[name][real] for name in names]).float().cpu())
        targets.append(logits[real].float().log_softmax(-1).cpu())
    if not stacks:
        raise MMLensError("no batches given: train the lens on at least one batch")
    return torch.cat(stacks, dim=1), torch.cat(targets)


def lens_kl(model: HookedModel, lens: TunedLens | None, resid: Tensor,
            target: Tensor) -> Float[Tensor, " layer"]:
    """Mean ``KL(final || lens)`` per layer ``-1..L-1`` (``lens=None``: the logit lens)."""
    with torch.no_grad():
        return torch.stack([_kl(model, lens, resid[i], i - 1, target)
                            for i in range(len(resid))])


def _kl(model: HookedModel, lens: TunedLens | None, resid: Tensor, layer: int,
        target: Tensor) -> Tensor:
    if lens is not None:
        resid = lens.translate(resid, layer)
    head_dtype = model.unembed.W_U.dtype
    log_probs = model.unembed(model.ln_final(resid.to(head_dtype))).float().log_softmax(-1)
    return (target.exp() * (target - log_probs)).sum(-1).mean()


def train_tuned_lens(
    model: HookedModel, batches: Iterable[MultimodalBatch], *, steps: int = 300,
    lr: float = 1e-3, items_per_step: int = 512, seed: int = 0,
) -> TunedLens:
    """Translators for every layer, trained by Adam on random minibatches of the real
    positions of ``batches`` (``steps`` steps of ``items_per_step`` positions) to minimise the
    summed per-layer KL to the model's final distribution. The model is not changed."""
    if steps < 1 or items_per_step < 1 or lr <= 0:
        raise MMLensError(f"steps and items_per_step must be at least 1 and lr positive, got "
                          f"steps={steps}, items_per_step={items_per_step}, lr={lr}")
    resid, target = lens_activations(model, batches)
    settings = {"steps": steps, "lr": lr, "items_per_step": items_per_step, "seed": seed,
                "n_positions": len(target)}
    lens = TunedLens(model.cfg.n_layers, model.cfg.d_model,
                     {"model": model_name(model), "training": settings})
    device = model.unembed.W_U.device
    lens.to(device)
    resid, target = resid.to(device), target.to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(lens.parameters(), lr=lr)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            pick = torch.randint(len(target), (min(items_per_step, len(target)),),
                                 generator=generator).to(device)
            with torch.enable_grad():
                loss = sum(_kl(model, lens, resid[i, pick], i - 1, target[pick])
                           for i in range(len(resid)))
                optimizer.zero_grad()
                loss.backward()
            optimizer.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return lens.cpu().eval()
