"""Experiments: the information-flow knockout sweep, answer emergence, resumable results.

    from mmlens.experiments import information_flow, answer_emergence
    df = information_flow(model, examples)        # one row per example x flow x centre layer
"""

from mmlens.experiments.emergence import answer_emergence, emergence_frame
from mmlens.experiments.knockouts import (
    DEFAULT_FLOWS,
    Flow,
    Knockout,
    default_window,
    parse_flows,
)
from mmlens.experiments.presets import (
    PAPER_PRESETS,
    PRESETS,
    StudySettings,
    resolve_settings,
)
from mmlens.experiments.runfolder.store import ResultStore
from mmlens.experiments.sweep import dropped_examples, information_flow, results_frame

__all__ = [
    "DEFAULT_FLOWS",
    "PAPER_PRESETS",
    "PRESETS",
    "Flow",
    "Knockout",
    "ResultStore",
    "StudySettings",
    "answer_emergence",
    "default_window",
    "dropped_examples",
    "emergence_frame",
    "information_flow",
    "parse_flows",
    "resolve_settings",
    "results_frame",
]
