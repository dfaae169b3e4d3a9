"""The paper's per-model settings, and the one place where study settings are resolved.

    settings = resolve_settings(model)                         # preset found from name/config
    settings = resolve_settings(model, "llava-hf/llava-1.5-7b-hf", window=5)   # preset + override
    settings.prepare_options()      # template, preprocessing, tokenization, related_rule

A paper preset sets, for one of the paper's four checkpoints, what the paper's code fed it:

1. the prompt, character for character (``VICUNA_V1_PAPER`` / ``LLAMA3_PAPER``), tokenized as
   the original LLaVA's ``tokenizer_image_token`` does (``tokenization="chunks"``);
2. related patches by the paper's pixel rule (``related_rule="paper"``);
3. LLaVA-1.5 images padded to a square with ``int(mean * 255)`` (``preprocessing="pad"``);
4. a flow whose span is empty blocks nothing and counts a 0% change (``empty_spans="zero"``);
5. window 7 (32 layers) or 9 (40 layers).

Each setting can also be chosen on its own, with or without a preset. Without a preset the
defaults are the processor's prompt handling, exact box geometry, and skipping empty spans.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from mmlens.experiments.knockouts import DEFAULT_FLOWS as PAPER_FLOWS
from mmlens.inputs.checkpoints import (
    PAPER_CHECKPOINTS,
    checkpoint_from_name,
    default_preprocessing,
    paper_checkpoint,
)
from mmlens.inputs.image_tokens import TOKENIZATIONS
from mmlens.inputs.spans import RELATED_RULES
from mmlens.inputs.templates import LLAMA3_PAPER, VICUNA_V1_PAPER, PromptTemplate, get_template
from mmlens.methods.windows import check_window

EMPTY_SPANS: tuple[str, ...] = ("skip", "zero")
NO_PRESET = "none"


@dataclass(frozen=True)
class StudyPreset:
    """How the paper ran one model.

    ``preprocessing`` is how images (and so boxes) reach the vision tower: ``"pad"`` (original
    LLaVA-1.5: pad to a square with the mean colour, then resize) or ``"anyres"`` (LLaVA-NeXT
    tiling, fixed by the model).
    """

    model: str
    template: PromptTemplate
    window: int
    preprocessing: str
    n_layers: int
    flows: tuple[str, ...] = PAPER_FLOWS
    only_correct: bool = True
    tokenization: str = "chunks"
    related_rule: str = "paper"
    empty_spans: str = "zero"
    notes: str = field(default="", compare=False)


PAPER_PRESETS: dict[str, StudyPreset] = {
    p.model: p
    for p in (
        StudyPreset(PAPER_CHECKPOINTS[0], VICUNA_V1_PAPER, 7, "pad", 32,
                    notes="trained with images padded to a square"),
        StudyPreset(PAPER_CHECKPOINTS[1], VICUNA_V1_PAPER, 9, "pad", 40,
                    notes="trained with images padded to a square"),
        StudyPreset(PAPER_CHECKPOINTS[2], VICUNA_V1_PAPER, 7, "anyres", 32),
        StudyPreset(PAPER_CHECKPOINTS[3], LLAMA3_PAPER, 7, "anyres", 32,
                    notes="Llama-3 chat template with a system prompt"),
    )
}


def get_preset(name: str) -> StudyPreset:
    """A paper preset by its checkpoint's hub name (or a folder named like it)."""
    found = checkpoint_from_name(name)
    if found is None:
        raise ValueError(f"no paper preset named {name!r}: use one of {', '.join(PAPER_PRESETS)}"
                         f", or {NO_PRESET!r} for none")
    return PAPER_PRESETS[found]


@dataclass(frozen=True)
class StudySettings:
    """Every choice that decides a study's numbers, resolved once (``resolve_settings``).

    ``preset``: the paper preset in force (None: none), ``preset_source``: why.
    ``preprocessing``: ``"pad"`` / ``"resize_crop"`` / ``"anyres"`` (the model's own tiling).
    """

    preset: str | None
    preset_source: str
    template: PromptTemplate
    preprocessing: str
    tokenization: str
    related_rule: str
    empty_spans: str
    window: int

    def prepare_options(self) -> dict[str, Any]:
        """Keyword arguments for ``prepare`` / ``prepare_examples``."""
        return {"template": self.template,
                "preprocessing": None if self.preprocessing == "anyres" else self.preprocessing,
                "tokenization": self.tokenization, "related_rule": self.related_rule}

    def record(self) -> dict[str, Any]:
        """The settings as plain values, for ``run.json`` and the resume signature."""
        return {"preset": self.preset, "preset_source": self.preset_source,
                "template": self.template.name, "preprocessing": self.preprocessing,
                "tokenization": self.tokenization, "related_rule": self.related_rule,
                "empty_spans": self.empty_spans, "window": self.window}

    def describe(self) -> str:
        """One line for the log."""
        found = (f"preset {self.preset} ({self.preset_source})" if self.preset
                 else f"no preset ({self.preset_source})")
        return (f"{found}: template {self.template.name}, images {self.preprocessing}, "
                f"tokenization {self.tokenization}, related patches by {self.related_rule} rule, "
                f"empty spans {self.empty_spans}, window {self.window}")


def resolve_settings(
    model: Any, preset: str | StudyPreset | StudySettings | None = None, *,
    template: str | PromptTemplate | None = None, preprocessing: str | None = None,
    tokenization: str | None = None, related_rule: str | None = None,
    empty_spans: str | None = None, window: int | None = None,
) -> StudySettings:
    """The study's settings: the preset's (given, or found from the model), then overrides.

    ``preset``: a hub name of one of the paper's checkpoints (applied to any model, a local
    folder included), ``"none"`` for no preset, or None to find it from the model's name or
    config. Every keyword given overrides the preset's choice.
    """
    if isinstance(preset, StudySettings):
        base = preset
    else:
        base = _preset_settings(model, preset)
    overrides = {k: v for k, v in {
        "template": None if template is None else get_template(template),
        "preprocessing": preprocessing, "tokenization": tokenization,
        "related_rule": related_rule, "empty_spans": empty_spans, "window": window,
    }.items() if v is not None}
    settings = replace(base, **overrides)
    _check(settings, model)
    return settings


def _preset_settings(model: Any, preset: str | StudyPreset | None) -> StudySettings:
    n_layers = model.cfg.n_layers
    if isinstance(preset, str) and preset == NO_PRESET:
        preset, source = None, "--preset none"
    elif isinstance(preset, str):
        preset, source = get_preset(preset), "chosen"
    elif isinstance(preset, StudyPreset):
        source = "chosen"
    else:
        found = paper_checkpoint(model)
        preset, source = ((PAPER_PRESETS[found[0]], f"found from the {found[1]}") if found
                          else (None, "none matches the model's name or config"))
    if preset is None:
        tokenizer = getattr(getattr(model, "processor", None), "tokenizer", None)
        return StudySettings(
            None, source, get_template(None, tokenizer),
            "anyres" if model.cfg.is_anyres else default_preprocessing(model), "whole",
            "geometry", "skip", check_window(None, n_layers))
    window = min(preset.window, n_layers)
    preprocessing = "anyres" if model.cfg.is_anyres else preset.preprocessing
    if preprocessing == "anyres" and not model.cfg.is_anyres:
        preprocessing = "pad"  # an anyres preset on a LLaVA-1.5 model: the paper pads those
    return StudySettings(preset.model, source, preset.template, preprocessing,
                         preset.tokenization, preset.related_rule, preset.empty_spans, window)


def _check(settings: StudySettings, model: Any) -> None:
    choices = {"tokenization": (settings.tokenization, TOKENIZATIONS),
               "related_rule": (settings.related_rule, RELATED_RULES),
               "empty_spans": (settings.empty_spans, EMPTY_SPANS),
               "preprocessing": (settings.preprocessing, ("pad", "resize_crop", "anyres"))}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}: use one of {allowed}")
    if settings.preprocessing == "anyres" and not model.cfg.is_anyres:
        raise ValueError("preprocessing 'anyres' needs a LLaVA-NeXT model: use 'pad' or "
                         "'resize_crop' for this one")
    check_window(settings.window, model.cfg.n_layers)


def preset_for(model_name: str, n_layers: int | None = None) -> StudyPreset:
    """The paper's preset for a known model name; for others, the Vicuna prompt, the
    processor's preprocessing and the window ``default_window`` gives."""
    found = checkpoint_from_name(model_name)
    if found is not None:
        return PAPER_PRESETS[found]
    if n_layers is None:
        raise ValueError(f"no preset for {model_name!r}: known presets are "
                         f"{', '.join(PAPER_PRESETS)}; pass n_layers to derive one")
    from mmlens.inputs.templates import VICUNA_V1
    from mmlens.methods.windows import default_window

    return StudyPreset(model_name, VICUNA_V1, default_window(n_layers), "resize_crop", n_layers,
                       tokenization="whole", related_rule="geometry", empty_spans="skip")
