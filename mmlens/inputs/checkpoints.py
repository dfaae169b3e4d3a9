"""Which of the paper's checkpoints a model is, from its name or its config's shape.

    paper_checkpoint(model)        # ("llava-hf/llava-1.5-7b-hf", "name ...") or None
    default_preprocessing(model)   # "pad" for LLaVA-1.5, the processor's own otherwise

A local copy of a checkpoint is recognised by its folder name (``.../llava-1.5-7b-hf``) or,
failing that, by the shape of its config (vocabulary, depth, width, anyres or not), which the
four checkpoints do not share.
"""

from __future__ import annotations

from typing import Any

PAPER_CHECKPOINTS: tuple[str, ...] = (
    "llava-hf/llava-1.5-7b-hf",
    "llava-hf/llava-1.5-13b-hf",
    "llava-hf/llava-v1.6-vicuna-7b-hf",
    "llava-hf/llama3-llava-next-8b-hf",
)
# (anyres, n_layers, d_model, d_vocab) of each checkpoint's config
_SHAPES: dict[tuple[bool, int, int, int], str] = {
    (False, 32, 4096, 32064): PAPER_CHECKPOINTS[0],
    (False, 40, 5120, 32064): PAPER_CHECKPOINTS[1],
    (True, 32, 4096, 32064): PAPER_CHECKPOINTS[2],
    (True, 32, 4096, 128320): PAPER_CHECKPOINTS[3],
}
LLAVA_15: tuple[str, ...] = PAPER_CHECKPOINTS[:2]


def _short(name: str) -> str:
    return name.split("/")[-1].removesuffix("-hf").lower()


def checkpoint_from_name(name: str) -> str | None:
    """The paper checkpoint whose name ends ``name`` (a hub name or a folder), else None."""
    tail = _short(name.rstrip("/"))
    for checkpoint in PAPER_CHECKPOINTS:
        if tail == _short(checkpoint) or name == checkpoint:
            return checkpoint
    return None


def paper_checkpoint(model: Any) -> tuple[str, str] | None:
    """``(checkpoint, how it was recognised)`` for one of the paper's four models, else None."""
    cfg = model.cfg
    name = str(getattr(getattr(cfg, "hf_config", None), "_name_or_path", "") or "")
    found = checkpoint_from_name(name) if name else None
    if found is not None:
        return found, f"model name {name!r}"
    family = getattr(model, "family", None)
    anyres = family is not None and family.fixed_preprocessing == "anyres"
    shape = (anyres, int(cfg.n_layers), int(cfg.d_model), int(cfg.d_vocab))
    if shape in _SHAPES:
        return _SHAPES[shape], (f"config shape (anyres {shape[0]}, {shape[1]} layers, d_model "
                                f"{shape[2]}, vocabulary {shape[3]})")
    return None


def default_preprocessing(model: Any) -> str:
    """How images reach the vision tower unless told otherwise.

    ``"pad"`` for a LLaVA-1.5 checkpoint (trained on images padded to a square) or a processor
    that pads; otherwise what the processor does (``"resize_crop"``, the Hugging Face CLIP
    processor's, or ``"resize"``).
    """
    image_processor = getattr(getattr(model, "processor", None), "image_processor", None)
    if getattr(image_processor, "do_pad_to_square", False) or getattr(
            image_processor, "mmlens_preprocessing", None) == "pad":
        return "pad"
    found = paper_checkpoint(model)
    if found is not None and found[0] in LLAVA_15:
        return "pad"
    vision = getattr(model.cfg, "vision", None)
    if image_processor is not None and getattr(vision, "image_size", None):
        from mmlens.core.errors import MMLensError
        from mmlens.inputs.preprocessing import processor_geometry

        try:
            return processor_geometry(image_processor, vision.image_size)
        except MMLensError:
            pass  # refused with its reason where boxes are mapped
    return "resize_crop"
