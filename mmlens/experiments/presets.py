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
5. window 7 (32 layers) or 9 (40 layers);
6. the correctness filter decoding up to 128 tokens (``filter_max_new_tokens``).

``FAMILY_PRESETS`` hold the models the paper did not study (LLaVA-OneVision, Qwen2-VL /
Qwen2.5-VL, the bundled ``shapes-llava``): their own chat template with the paper's answer
instruction and a window scaled like the paper's (7 of 32 layers), with the non-paper rules
(the processor's tokenization, exact box geometry, empty spans skipped).

Each setting can also be chosen on its own, with or without a preset. Without a preset the
defaults are the processor's prompt handling, exact box geometry, and skipping empty spans.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from mmlens.experiments.correctness import FILTER_MAX_NEW_TOKENS
from mmlens.experiments.knockouts import DEFAULT_FLOWS as PAPER_FLOWS
from mmlens.inputs.checkpoints import (
    PAPER_CHECKPOINTS,
    checkpoint_from_name,
    default_preprocessing,
    paper_checkpoint,
)
from mmlens.inputs.image_tokens import TOKENIZATIONS
from mmlens.inputs.spans import RELATED_RULES
from mmlens.inputs.templates import (
    GEMMA3,
    IDEFICS3,
    INTERNVL,
    LLAMA3_PAPER,
    MLLAMA,
    ONEVISION,
    PALIGEMMA,
    QWEN3_VL,
    QWEN_VL,
    VICUNA_V1,
    VICUNA_V1_PAPER,
    PromptTemplate,
    get_template,
)
from mmlens.methods.windows import check_window, default_window

EMPTY_SPANS: tuple[str, ...] = ("skip", "zero")
NO_PRESET = "none"


@dataclass(frozen=True)
class StudyPreset:
    """How the paper ran one model.

    ``preprocessing`` is how images (and so boxes) reach the vision tower: ``"pad"`` (original
    LLaVA-1.5: pad to a square with the mean colour, then resize), ``"resize_crop"`` (what a
    Hugging Face CLIP processor does), ``"anyres"`` (LLaVA-NeXT / LLaVA-OneVision tiling,
    fixed by the model), ``"dynamic_tiles"`` (InternVL's tiles chosen by aspect ratio plus a
    thumbnail, fixed by the model), ``"tiles"`` (Idefics3's rows x columns of tiles plus a
    global view, fixed by the model) or ``"dynamic"`` (Qwen-VL's aspect-preserving resize to
    28 px multiples, fixed by the model).
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

_NOT_PAPER = {"tokenization": "whole", "related_rule": "geometry", "empty_spans": "skip"}
FAMILY_PRESETS: dict[str, StudyPreset] = {
    p.model: p
    for p in (
        StudyPreset("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", ONEVISION, default_window(24),
                    "anyres", 24, **_NOT_PAPER,
                    notes="not in the paper: Qwen chat template; window scaled from the paper's"),
        StudyPreset("llava-hf/llava-onevision-qwen2-7b-ov-hf", ONEVISION, default_window(28),
                    "anyres", 28, **_NOT_PAPER,
                    notes="not in the paper: Qwen chat template; window scaled from the paper's"),
        StudyPreset("shapes-llava", VICUNA_V1, 3, "resize_crop", 8, **_NOT_PAPER,
                    notes="the bundled toy model; square images, so pad and crop agree"),
        *(StudyPreset(name, QWEN_VL, default_window(n_layers), "dynamic", n_layers, **_NOT_PAPER,
                      notes="not in the paper: its instruction in the Qwen chat template, its "
                            "window scaled to the depth")
          for name, n_layers in (("Qwen/Qwen2-VL-2B-Instruct", 28),
                                 ("Qwen/Qwen2-VL-7B-Instruct", 28),
                                 ("Qwen/Qwen2.5-VL-3B-Instruct", 36),
                                 ("Qwen/Qwen2.5-VL-7B-Instruct", 28))),
        *(StudyPreset(name, GEMMA3, default_window(n_layers), "resize", n_layers, **_NOT_PAPER,
                      notes="not in the paper: its instruction in Gemma 3's chat template, its "
                            "window scaled to the depth; the processor resizes without cropping")
          for name, n_layers in (("google/gemma-3-4b-it", 34), ("google/gemma-3-12b-it", 48))),
        *(StudyPreset(name, PALIGEMMA, default_window(n_layers), "resize", n_layers, **_NOT_PAPER,
                      notes="not in the paper: PaliGemma's prompt form (answer en), a prefix "
                            "that attends both ways; window scaled to the depth")
          for name, n_layers in (("google/paligemma-3b-pt-224", 18),
                                 ("google/paligemma2-3b-pt-224", 26))),
        *(StudyPreset(name, QWEN3_VL, default_window(n_layers), "dynamic", n_layers,
                      **_NOT_PAPER,
                      notes="not in the paper: its instruction in Qwen3-VL's chat template, "
                            "its window scaled to the depth")
          for name, n_layers in (("Qwen/Qwen3-VL-2B-Instruct", 28),
                                 ("Qwen/Qwen3-VL-4B-Instruct", 36),
                                 ("Qwen/Qwen3-VL-8B-Instruct", 36))),
        StudyPreset("HuggingFaceTB/SmolVLM-256M-Instruct", IDEFICS3, default_window(30),
                    "tiles", 30, **_NOT_PAPER,
                    notes="not in the paper: its instruction in SmolVLM's chat template, its "
                          "window scaled to the depth"),
        *(StudyPreset(name, INTERNVL, default_window(n_layers), "dynamic_tiles", n_layers,
                      **_NOT_PAPER,
                      notes="not in the paper: its instruction in InternVL 3's chat template, "
                            "its window scaled to the depth")
          for name, n_layers in (("OpenGVLab/InternVL3-1B-hf", 24),
                                 ("OpenGVLab/InternVL3-2B-hf", 28),
                                 ("OpenGVLab/InternVL3-8B-hf", 28))),
        StudyPreset("meta-llama/Llama-3.2-11B-Vision-Instruct", MLLAMA, default_window(40),
                    "tiles", 40, **_NOT_PAPER,
                    notes="not in the paper: its instruction in Llama-3.2-Vision's chat "
                          "template, its window scaled to the depth (cross-attention layers "
                          "counted); the image is read by cross-attention only"),
    )
}
PRESETS: dict[str, StudyPreset] = {**PAPER_PRESETS, **FAMILY_PRESETS}
"""Every preset, by model name: the paper's four checkpoints, then the other families'."""
FIXED_BY_MODEL: tuple[str, ...] = ("anyres", "dynamic", "tiles", "dynamic_tiles")
"""Preprocessing a model's own processor fixes (no choice to pass on to ``prepare``)."""


def _short(name: str) -> str:
    return name.rstrip("/").split("/")[-1].removesuffix("-hf").lower()


def preset_from_name(name: str) -> StudyPreset | None:
    """The preset whose model name ends ``name`` (a hub name or a folder named like it)."""
    found = checkpoint_from_name(name)
    if found is not None:
        return PAPER_PRESETS[found]
    tail = _short(name)
    for preset in FAMILY_PRESETS.values():
        if name == preset.model or tail == _short(preset.model):
            return preset
    return None


def get_preset(name: str) -> StudyPreset:
    """A preset by its model's hub name (or a folder named like it)."""
    found = preset_from_name(name)
    if found is None:
        raise ValueError(f"no preset named {name!r}: use one of {', '.join(PRESETS)}"
                         f", or {NO_PRESET!r} for none")
    return found


@dataclass(frozen=True)
class StudySettings:
    """Every choice that decides a study's numbers, resolved once (``resolve_settings``).

    ``preset``: the preset in force (None: none), ``preset_source``: why.
    ``preprocessing``: ``"pad"`` / ``"resize_crop"`` / ``"resize"``, or one of
    ``FIXED_BY_MODEL`` (fixed by the model's own processor).
    """

    preset: str | None
    preset_source: str
    template: PromptTemplate
    preprocessing: str
    tokenization: str
    related_rule: str
    empty_spans: str
    window: int
    control_seed: int | None = None
    filter_max_new_tokens: int = FILTER_MAX_NEW_TOKENS

    def prepare_options(self) -> dict[str, Any]:
        """Keyword arguments for ``prepare`` / ``prepare_examples``."""
        return {"template": self.template,
                "preprocessing": (None if self.preprocessing in FIXED_BY_MODEL
                                  else self.preprocessing),
                "tokenization": self.tokenization, "related_rule": self.related_rule}

    def record(self) -> dict[str, Any]:
        """The settings as plain values, for ``run.json`` and the resume signature."""
        return {"preset": self.preset, "preset_source": self.preset_source,
                "template": self.template.name, "preprocessing": self.preprocessing,
                "tokenization": self.tokenization, "related_rule": self.related_rule,
                "empty_spans": self.empty_spans, "window": self.window,
                "control_seed": self.control_seed,
                "filter_max_new_tokens": self.filter_max_new_tokens}

    def describe(self) -> str:
        """One line for the log."""
        found = (f"preset {self.preset} ({self.preset_source})" if self.preset
                 else f"no preset ({self.preset_source})")
        return (f"{found}: template {self.template.name}, images {self.preprocessing}, "
                f"tokenization {self.tokenization}, related patches by {self.related_rule} rule, "
                f"empty spans {self.empty_spans}, window {self.window}, correctness filter "
                f"decodes up to {self.filter_max_new_tokens} tokens"
                + (f", control seed {self.control_seed}" if self.control_seed is not None
                   else ""))


def resolve_settings(
    model: Any, preset: str | StudyPreset | StudySettings | None = None, *,
    template: str | PromptTemplate | None = None, preprocessing: str | None = None,
    tokenization: str | None = None, related_rule: str | None = None,
    empty_spans: str | None = None, window: int | None = None,
    control_seed: int | None = None, filter_max_new_tokens: int | None = None,
) -> StudySettings:
    """The study's settings: the preset's (given, or found from the model), then overrides.

    ``preset``: a preset's model name (``PRESETS``: the paper's four checkpoints and the other
    families'; applied to any model, a local folder included), ``"none"`` for no preset, or
    None to find it from the model's name or config. Every keyword given overrides the
    preset's choice. ``control_seed``: the seed of the random controls (None: no controls);
    ``filter_max_new_tokens``: how far the correctness filter decodes (default 128, the
    paper's).
    """
    if isinstance(preset, StudySettings):
        base = preset
    else:
        base = _preset_settings(model, preset)
    overrides = {k: v for k, v in {
        "template": None if template is None else get_template(template),
        "preprocessing": preprocessing, "tokenization": tokenization,
        "related_rule": related_rule, "empty_spans": empty_spans, "window": window,
        "control_seed": control_seed, "filter_max_new_tokens": filter_max_new_tokens,
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
        preset, source = _found_preset(model)
    fixed = _fixed_preprocessing(model)
    if preset is None:
        tokenizer = getattr(getattr(model, "processor", None), "tokenizer", None)
        template = get_template(getattr(getattr(model, "family", None), "prompt_template", None),
                                tokenizer)
        return StudySettings(
            None, source, template, fixed or default_preprocessing(model),
            "whole", "geometry", "skip", check_window(None, n_layers))
    window = min(preset.window, n_layers)
    preprocessing = fixed or preset.preprocessing
    if not fixed and preprocessing in FIXED_BY_MODEL:
        # a tiling preset on a model without tiling: the paper pads LLaVA-1.5's images; the
        # other families' presets leave the model's own default
        preprocessing = "pad" if preset.model in PAPER_PRESETS else default_preprocessing(model)
    return StudySettings(preset.model, source, preset.template, preprocessing,
                         preset.tokenization, preset.related_rule, preset.empty_spans, window)


def _found_preset(model: Any) -> tuple[StudyPreset | None, str]:
    """The preset named like the model, else a paper checkpoint recognised by config shape."""
    name = str(getattr(getattr(model.cfg, "hf_config", None), "_name_or_path", "") or "")
    by_name = preset_from_name(name) if name else None
    if by_name is not None:
        return by_name, f"found from the model name {name!r}"
    found = paper_checkpoint(model)
    if found is not None:
        return PAPER_PRESETS[found[0]], f"found from the {found[1]}"
    return None, "none matches the model's name or config"


def _fixed_preprocessing(model: Any) -> str | None:
    """One of ``FIXED_BY_MODEL`` where the model's processor fixes the geometry."""
    family = getattr(model, "family", None)
    return None if family is None else family.fixed_preprocessing


def _check(settings: StudySettings, model: Any) -> None:
    choices = {"tokenization": (settings.tokenization, TOKENIZATIONS),
               "related_rule": (settings.related_rule, RELATED_RULES),
               "empty_spans": (settings.empty_spans, EMPTY_SPANS),
               "preprocessing": (settings.preprocessing, ("pad", "resize_crop", "resize",
                                                          *FIXED_BY_MODEL))}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}: use one of {allowed}")
    fixed = _fixed_preprocessing(model)
    if (settings.preprocessing in FIXED_BY_MODEL or fixed) and settings.preprocessing != fixed:
        renamed = (" (InternVL's tiling was recorded as 'anyres' before it had its own name)"
                   if (settings.preprocessing, fixed) == ("anyres", "dynamic_tiles") else "")
        raise ValueError(f"preprocessing {settings.preprocessing!r} does not fit this model "
                         f"(its processor's is {fixed or 'pad, resize_crop or resize'!r}"
                         f"{renamed}): leave preprocessing unset")
    family = getattr(model, "family", None)
    if settings.related_rule == "paper" and family is not None and not family.pixel_rule:
        raise ValueError(f"the paper's pixel rule (related_rule 'paper') is defined for the "
                         f"paper's families (LLaVA-1.5, LLaVA-NeXT), not {family.name!r}: pass "
                         "--related-rule geometry (related_rule='geometry'), which maps boxes "
                         "through this family's processor")
    check_window(settings.window, model.cfg.n_layers)
    counts = {"filter_max_new_tokens (--filter-max-new-tokens)":
              (settings.filter_max_new_tokens, 1),
              "control_seed (--control-seed)": (settings.control_seed, 0)}
    for name, (value, least) in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < least):
            raise ValueError(f"{name} must be an integer of at least {least}, got {value!r}")


def preset_for(model_name: str, n_layers: int | None = None) -> StudyPreset:
    """The preset for a known model name; for others, the Vicuna prompt, the processor's
    preprocessing and the window ``default_window`` gives."""
    found = preset_from_name(model_name)
    if found is not None:
        return found
    if n_layers is None:
        raise ValueError(f"no preset for {model_name!r}: known presets are "
                         f"{', '.join(PRESETS)}; pass n_layers to derive one")
    return StudyPreset(model_name, VICUNA_V1, default_window(n_layers), "resize_crop", n_layers,
                       tokenization="whole", related_rule="geometry", empty_spans="skip")
