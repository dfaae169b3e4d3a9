"""One example's knockout curve for one flow, across layer windows: what the explorers draw
beside a causal map.

    curve = flow_curve(model, batch, "image->last", window=3, example=0)
    curve["rel_change"]        # one value (%) per centre layer 0..L-1

For each centre layer the attention from the flow's target span to its source span is blocked
in the window around it (``window_layers``), and the answer's probability at the last
position is compared with the clean run's: the numbers the study's sweep gives that example
(``information_flow``'s ``rel_change``; the answer is the clean top token, never the image
token). Exact and batched as ``causal_map``: one clean run, then each window's variant resumed
from its first layer on the clean keys/values of the positions before the target span.
"""

from __future__ import annotations

import pandas as pd
import torch

from mmlens.core.errors import MMLensError
from mmlens.inputs.batch import MultimodalBatch
from mmlens.methods.causal_map import blocked_probs
from mmlens.methods.clean_run import clean_run, single_example
from mmlens.methods.windows import check_window, window_layers
from mmlens.model.protocol import HookedModel

COLUMNS = ["flow", "layer", "window_start", "window_end", "p_base", "p_block", "rel_change"]


def flow_spans_of(flow: str) -> tuple[str, str]:
    """``"SRC->DST"`` as ``(source, target)`` span names."""
    source, arrow, target = flow.partition("->")
    if not arrow or not source.strip() or not target.strip():
        raise MMLensError(f"flow {flow!r} is not 'SOURCE->TARGET' (e.g. 'image->last')")
    return source.strip(), target.strip()


@torch.no_grad()
def flow_curve(model: HookedModel, batch: MultimodalBatch, flow: str, *,
               window: int | None = None, example: int = 0,
               batch_size: int = 64) -> pd.DataFrame:
    """One row per centre layer (``COLUMNS``; ``window_end`` exclusive, ``rel_change`` in
    percent). A flow with an empty span in this example blocks nothing: its rows are NaN."""
    source, target = flow_spans_of(flow)
    n_layers = model.cfg.n_layers
    window = check_window(window, n_layers)
    one = single_example(batch, example)
    offset = batch.input_ids.shape[1] - one.input_ids.shape[1]
    src = batch.positions(source, example) - offset
    dst = batch.positions(target, example) - offset
    clean = clean_run(model, one)
    token = clean.prediction(exclude=model.cfg.image_token_id)
    p_base = clean.prob(token)
    windows = [window_layers(centre, window, n_layers) for centre in range(n_layers)]
    blocked = (None if len(src) == 0 or len(dst) == 0 else  # every window in one batched run
               blocked_probs(model, clean, [src.cpu()], [(dst.cpu(), w) for w in windows],
                             token, batch_size)[:, 0])
    rows = []
    for centre, layers in enumerate(windows):
        p_block = float("nan") if blocked is None else float(blocked[centre])
        change = (p_block - p_base) / p_base * 100 if p_base > 0 else float("nan")
        rows.append((flow, centre, layers[0], layers[-1] + 1, p_base, p_block, change))
    return pd.DataFrame(rows, columns=COLUMNS)
