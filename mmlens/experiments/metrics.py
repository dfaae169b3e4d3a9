"""From stored per-example records to the long results table, under a chosen metric.

Metrics (what a knockout's effect is measured in):

- ``prob`` (the paper's): ``rel_change = (p_block - p_base) / p_base * 100``, in percent.
- ``logprob``: ``change = log p_block - log p_base``.
- ``logit-diff``: the answer's logit minus the wrong option's, ``change`` = knocked out minus
  clean. Both tokens are in the form of the token the model produced (``Red`` vs ``Green``,
  ``mmlens.experiments.answer_forms``); the record's ``metric_tokens`` names them. Examples
  without a wrong option get NaN, and a ``dropped`` entry per flow saying so.

``rel_change`` is always there; the other metrics add ``metric_base``, ``metric_block`` and
``change``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from mmlens.experiments.controls import control_flow
from mmlens.experiments.knockouts import Flow
from mmlens.methods.windows import window_layers

METRICS: tuple[str, ...] = ("prob", "logprob", "logit-diff")
NO_FOIL = ("no wrong option (or one sharing the answer's first token): logit-diff has no value; "
           "its rows are kept with change NaN")
COLUMNS = ["example_id", "task", "flow", "layer", "window_start", "window_end", "answer_token",
           "answer", "p_base", "p_block", "rel_change"]


def _log(p: float) -> float:
    return math.log(p) if p > 0 else float("-inf")


def metric_values(record: Mapping[str, Any], flow: str, metric: str
                  ) -> tuple[float, list[float]]:
    """``(clean value, value per centre layer)`` of one record's flow under ``metric``."""
    p_base, p_block = record["p_base"], record["p_block"][flow]
    if metric == "logprob":
        return _log(p_base), [_log(p) for p in p_block]
    if "metric_tokens" not in record:
        return float("nan"), [float("nan")] * len(p_block)
    (answer, wrong), block = record["p_metric_base"], record["p_metric_block"][flow]
    # logit(a) - logit(w) = log p(a) - log p(w): the shared normaliser cancels
    return _log(answer) - _log(wrong), [_log(a) - _log(w) for a, w in block]


def results_frame(records: Sequence[Mapping[str, Any]], flows: Sequence[Flow], window: int,
                  n_layers: int, metric: str = "prob") -> pd.DataFrame:
    """The long table of stored records; ``attrs["dropped"]`` lists the dropped examples.

    Each flow's random control (``random_SRC->DST``), where stored, follows its flow.
    """
    windows = [window_layers(layer, window, n_layers) for layer in range(n_layers)]
    names = [name for flow in flows for name in (flow.name, control_flow(flow).name)]
    rows, dropped = [], []
    for record in records:
        if record.get("dropped"):
            dropped.append({"example_id": record["example_id"], "task": record["task"],
                            "flow": "all", "reason": record["dropped"]})
            continue
        for flow, reason in record.get("skipped", {}).items():
            dropped.append({"example_id": record["example_id"], "task": record["task"],
                            "flow": flow, "reason": reason})
        if metric == "logit-diff" and "metric_tokens" not in record:
            dropped.extend({"example_id": record["example_id"], "task": record["task"],
                            "flow": name, "reason": NO_FOIL} for name in record["p_block"])
        p_base = record["p_base"]
        for name in names:
            if name not in record["p_block"]:
                continue
            values = (metric_values(record, name, metric) if metric != "prob" else None)
            for layer, p_block in enumerate(record["p_block"][name]):
                row = {
                    "example_id": record["example_id"], "task": record["task"], "flow": name,
                    "layer": layer, "window_start": windows[layer][0],
                    "window_end": windows[layer][-1] + 1, "answer_token": record["answer_token"],
                    "answer": record["answer"], "p_base": p_base, "p_block": p_block,
                    "rel_change": (p_block - p_base) / p_base * 100.0,
                }
                if values is not None:
                    row.update({"metric_base": values[0], "metric_block": values[1][layer],
                                "change": values[1][layer] - values[0]})
                rows.append(row)
    columns = COLUMNS + (["metric_base", "metric_block", "change"] if metric != "prob" else [])
    frame = pd.DataFrame(rows, columns=columns)
    # Plain records, not a DataFrame: pandas compares attrs with == in concat and merges.
    frame.attrs["dropped"] = dropped
    frame.attrs["window"] = window
    frame.attrs["metric"] = metric
    return frame
