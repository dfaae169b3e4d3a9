"""Per-model settings of the paper's study: prompt template, window, preprocessing, flows."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmlens.experiments.knockouts import DEFAULT_FLOWS as PAPER_FLOWS
from mmlens.experiments.knockouts import default_window
from mmlens.inputs.templates import LLAMA3, ONEVISION, QWEN_VL, VICUNA_V1, PromptTemplate

FIXED_BY_MODEL = ("anyres", "dynamic")
"""Preprocessing a model's own processor fixes (no choice to pass on to ``prepare``)."""


@dataclass(frozen=True)
class StudyPreset:
    """How the paper ran one model.

    ``preprocessing`` is how images (and so boxes) reach the vision tower: ``"pad"`` (original
    LLaVA-1.5: pad to a square with the mean colour, then resize), ``"resize_crop"`` (what a
    Hugging Face CLIP processor does), ``"anyres"`` (LLaVA-NeXT / LLaVA-OneVision tiling,
    fixed by the model) or ``"dynamic"`` (Qwen-VL's aspect-preserving resize to 28 px
    multiples, fixed by the model).
    """

    model: str
    template: PromptTemplate
    window: int
    preprocessing: str
    n_layers: int
    flows: tuple[str, ...] = PAPER_FLOWS
    only_correct: bool = True
    notes: str = field(default="", compare=False)


PAPER_PRESETS: dict[str, StudyPreset] = {
    p.model: p
    for p in (
        StudyPreset("llava-hf/llava-1.5-7b-hf", VICUNA_V1, 7, "pad", 32,
                    notes="trained with images padded to a square"),
        StudyPreset("llava-hf/llava-1.5-13b-hf", VICUNA_V1, 9, "pad", 40,
                    notes="trained with images padded to a square"),
        StudyPreset("llava-hf/llava-v1.6-vicuna-7b-hf", VICUNA_V1, 7, "anyres", 32),
        StudyPreset("llava-hf/llama3-llava-next-8b-hf", LLAMA3, 7, "anyres", 32,
                    notes="Llama-3 chat template with a system prompt"),
        # Not in the paper: its prompt style in the Qwen chat template, its window scaled
        # (7 of 32 layers) to the 24- and 28-layer Qwen2 decoders.
        StudyPreset("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", ONEVISION, default_window(24),
                    "anyres", 24, notes="Qwen chat template; window scaled from the paper's"),
        StudyPreset("llava-hf/llava-onevision-qwen2-7b-ov-hf", ONEVISION, default_window(28),
                    "anyres", 28, notes="Qwen chat template; window scaled from the paper's"),
        StudyPreset("shapes-llava", VICUNA_V1, 3, "resize_crop", 8,
                    notes="the bundled toy model; square images, so both modes agree"),
        *(StudyPreset(name, QWEN_VL, default_window(n_layers), "dynamic", n_layers,
                      notes="not in the paper: its instruction in the Qwen chat template, its "
                            "window scaled to the depth")
          for name, n_layers in (("Qwen/Qwen2-VL-2B-Instruct", 28),
                                 ("Qwen/Qwen2-VL-7B-Instruct", 28),
                                 ("Qwen/Qwen2.5-VL-3B-Instruct", 36),
                                 ("Qwen/Qwen2.5-VL-7B-Instruct", 28))),
    )
}


def preset_for(model_name: str, n_layers: int | None = None) -> StudyPreset:
    """The paper's preset for a known model; for others, the Vicuna prompt, the processor's
    preprocessing and a window scaled like the paper's (7 of 32 layers)."""
    if model_name in PAPER_PRESETS:
        return PAPER_PRESETS[model_name]
    if n_layers is None:
        raise ValueError(f"no preset for {model_name!r}: known presets are "
                         f"{', '.join(PAPER_PRESETS)}; pass n_layers to derive one")
    window = max(1, round(n_layers * 7 / 32))
    window += 1 - window % 2  # odd, so the window is centred
    return StudyPreset(model_name, VICUNA_V1, window, "resize_crop", n_layers)
