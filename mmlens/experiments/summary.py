"""Per-task summary of a knockout sweep: where each flow's largest drop is and how wide it is."""

from __future__ import annotations

import pandas as pd


def flow_summary(frame: pd.DataFrame, by: tuple[str, ...] = ("task", "flow")) -> pd.DataFrame:
    """One row per task x flow (and an ``"all"`` task row per flow).

    Columns: ``peak_layer`` (centre layer of the largest mean drop), ``peak_change`` (that mean
    relative change, percent, negative for a drop), ``half_start`` / ``half_end`` (the
    contiguous layers around the peak where the mean drop is at least half the peak's) and
    ``n_examples``. A flow that never lowers the probability has ``peak_change >= 0`` and no
    half range (``NaN``).
    """
    required = {"flow", "layer", "rel_change", "example_id"} | set(by)
    missing = required - set(frame.columns)
    if missing:
        raise ValueError(f"the results table lacks columns {sorted(missing)}: pass the frame "
                         "information_flow returned (or flow.csv)")
    every = frame.assign(task="all") if "task" in by else frame
    frames = [frame, every] if "task" in by else [frame]
    rows = []
    for part in frames:
        for key, group in part.groupby(list(by), sort=True):
            curve = group.groupby("layer")["rel_change"].mean().sort_index()
            rows.append({**dict(zip(by, key, strict=True)), **_peak(curve),
                         "n_examples": group["example_id"].nunique()})
    return pd.DataFrame(rows)


def _peak(curve: pd.Series) -> dict[str, float]:
    peak_layer = int(curve.idxmin())
    peak = float(curve.loc[peak_layer])
    if peak >= 0:
        return {"peak_layer": peak_layer, "peak_change": peak, "half_start": float("nan"),
                "half_end": float("nan")}
    layers = list(curve.index)
    at = layers.index(peak_layer)
    start = end = at
    while start > 0 and curve.iloc[start - 1] <= peak / 2:
        start -= 1
    while end < len(layers) - 1 and curve.iloc[end + 1] <= peak / 2:
        end += 1
    return {"peak_layer": peak_layer, "peak_change": peak, "half_start": layers[start],
            "half_end": layers[end]}
