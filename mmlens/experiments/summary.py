"""Per-task summary of a knockout sweep: where each flow's largest drop is, how wide, how sure.

Every figure comes with a bootstrap 95% interval: examples are resampled with replacement
``n_boot`` times, the mean curve recomputed, and the figure read off each resample;
``*_low`` / ``*_high`` are the 2.5th and 97.5th percentiles. ``peak_change``'s interval is
that of the mean at the peak layer (the minimum of each resampled curve would be biased low).
Each group draws from its own random stream, seeded from ``(seed, task, flow)``
(``group_seed``), so adding flows or controls to a run leaves every other group's interval
as it was. Only examples with a value (not NaN, e.g. a question without a wrong option under
``logit-diff``) are counted (``n_examples``) and resampled. Of two equally large drops the
earlier layer is the peak.
"""

from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pandas as pd

FIGURES = ("peak_layer", "peak_change", "half_start", "half_end")


def flow_summary(frame: pd.DataFrame, by: tuple[str, ...] = ("task", "flow"), *,
                 value: str | None = None, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per task x flow (and an ``"all"`` task row per flow).

    Columns: ``peak_layer`` (centre layer of the largest mean drop), ``peak_change`` (that mean
    change, negative for a drop: percent for ``rel_change``), ``half_start`` / ``half_end``
    (the contiguous centre layers around the peak where the mean drop is at least half the
    peak's, both included), each with ``_low`` / ``_high`` bootstrap bounds, and
    ``n_examples``. A flow that never lowers the value has ``peak_change >= 0`` and no half
    range (``NaN``). ``value``: the column to summarise (default ``change`` when the table has
    it, else ``rel_change``). Layers are integers (``Int64``; missing as ``<NA>``).
    """
    value = value or ("change" if "change" in frame.columns else "rel_change")
    required = {"flow", "layer", value, "example_id"} | set(by)
    missing = required - set(frame.columns)
    if missing:
        raise ValueError(f"the results table lacks columns {sorted(missing)}: pass the frame "
                         "information_flow returned (or flow.csv)")
    every = frame.assign(task="all") if "task" in by else frame
    frames = [frame, every] if "task" in by else [frame]
    rows = []
    for part in frames:
        for key, group in part.groupby(list(by), sort=True):
            key = key if isinstance(key, tuple) else (key,)
            table = group.pivot_table(index="example_id", columns="layer", values=value,
                                      aggfunc="mean", dropna=False).sort_index(axis=1)
            layers = np.asarray(table.columns)
            values = table.to_numpy(dtype=float)
            values = values[np.isfinite(values).any(axis=1)]  # examples with a value only
            rng = np.random.default_rng(group_seed(seed, key))
            row = {**dict(zip(by, key, strict=True)),
                   **_peak(_mean(values), layers)}
            draws = rng.integers(0, len(values), size=(n_boot, len(values))) if len(
                values) else []
            curves = [_mean(values[d]) for d in draws]
            boot = [_peak(curve, layers) for curve in curves]
            at = np.flatnonzero(layers == row["peak_layer"])
            for figure in FIGURES:
                samples = np.array([b[figure] for b in boot], dtype=float)
                if figure == "peak_change" and len(at):
                    samples = np.array([curve[at[0]] for curve in curves])
                low, high = (np.nanpercentile(samples, [2.5, 97.5])
                             if np.isfinite(samples).any() else (np.nan, np.nan))
                row[f"{figure}_low"], row[f"{figure}_high"] = low, high
            rows.append({**row, "n_examples": len(values)})
    columns = [*by, *[c for f in FIGURES for c in (f, f"{f}_low", f"{f}_high")], "n_examples"]
    result = pd.DataFrame(rows, columns=columns)
    for column in columns:
        if column.startswith(("peak_layer", "half_")):
            result[column] = result[column].round().astype("Int64")
    return result


def _mean(values: np.ndarray) -> np.ndarray:
    """The mean curve over examples (rows), NaN where a layer has no value."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an empty layer's mean is NaN
        return np.nanmean(values, axis=0) if len(values) else np.full(values.shape[1], np.nan)


def group_seed(seed: int, key: tuple) -> int:
    """The bootstrap seed of one group (e.g. ``("all", "question->last")``), from ``seed``
    and the group's key alone."""
    text = json.dumps([int(seed), *[str(part) for part in key]])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _peak(curve: np.ndarray, layers: np.ndarray) -> dict[str, float]:
    if np.isnan(curve).all():
        return dict.fromkeys(FIGURES, float("nan"))
    at = int(np.nanargmin(curve))
    peak = float(curve[at])
    if peak >= 0:
        return {"peak_layer": int(layers[at]), "peak_change": peak, "half_start": float("nan"),
                "half_end": float("nan")}
    start = end = at
    while start > 0 and curve[start - 1] <= peak / 2:
        start -= 1
    while end < len(curve) - 1 and curve[end + 1] <= peak / 2:
        end += 1
    return {"peak_layer": int(layers[at]), "peak_change": peak,
            "half_start": int(layers[start]), "half_end": int(layers[end])}
