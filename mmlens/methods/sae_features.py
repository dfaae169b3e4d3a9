"""SAE features on image tokens: where in the image a feature fires, and how much of a flow's
knockout effect the top features of a span carry.

    frame = image_features(model, batch, sae, top=5)          # per example, feature, token
    mmlens.plotting.feature_map_figure(frame, image).show()
    flow = feature_flow(model, batch, saes, layers=window, src="related", dst="last", k=10)

``image_features`` reads ``{hook}.hook_sae_acts_post`` with the SAE spliced (error term on, so
the run is the model's own) at every image token; on a vision-tower hook each token reads the
mean over the tower patches it was built from (``batch.vision_positions``: one patch on
LLaVA-1.5 and LLaVA-NeXT, the ``merge_size**2`` merged patches on Qwen-VL). Rows carry the
token's grid place and pixel box (``mmlens.methods.image_regions``).

``feature_flow`` asks the question of the paper's successors: knock out ``src -> dst`` in the
window (``block_attention``) and, separately, zero the ``k`` features most active on the
``src`` positions in each SAE (at those positions only, the error term kept); ``share`` is the
feature ablation's change of the target's probability over the knockout's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from mmlens.core.errors import MMLensError
from mmlens.inputs.batch import MultimodalBatch
from mmlens.methods.image_regions import image_token_cells, original_size
from mmlens.methods.knockout import PositionSpec, block_attention, resolve_positions
from mmlens.model.protocol import HookedModel

FEATURE_COLUMNS = ["example", "feature", "region", "position", "tile", "row", "col", "x0", "y0",
                   "x1", "y1", "activation"]


@torch.no_grad()
def image_features(model: HookedModel, batch: MultimodalBatch, sae: Any, *,
                   features: Sequence[int] | None = None, top: int = 5,
                   images: Sequence[Any] | None = None,
                   preprocessing: str | None = None) -> pd.DataFrame:
    """Each feature's activation at each image token: one row per example, feature and token.

    ``features``: the features to read; default the ``top`` most active over each example's
    image tokens. ``images``: as in ``causal_map`` (for the pixel boxes).
    """
    name = f"{sae.hook_name}.hook_sae_acts_post"
    with model.saes([sae], use_error_term=True):
        _, cache = model.run_with_cache(batch, names_filter=name)
    acts = cache[name]
    rows = []
    for i in range(len(batch)):
        cells = image_token_cells(model, batch, i, original_size(batch, images, i),
                                  preprocessing)
        per_token = _token_acts(model, batch, acts, i, [c.position for c in cells],
                                sae.hook_name)  # [tokens, d_sae]
        chosen = (list(features) if features is not None
                  else per_token.sum(0).topk(min(top, per_token.shape[1])).indices.tolist())
        for feature in chosen:
            for cell, value in zip(cells, per_token[:, feature].tolist(), strict=True):
                rows.append((i, feature, f"{cell.tile}:{cell.row},{cell.col}", [cell.position],
                             cell.tile, cell.row, cell.col, *cell.box, value))
    frame = pd.DataFrame(rows, columns=FEATURE_COLUMNS)
    frame.attrs["hook_name"] = sae.hook_name
    return frame


def _token_acts(model: HookedModel, batch: MultimodalBatch, acts: Tensor, example: int,
                positions: list[int], hook_name: str) -> Tensor:
    """``[tokens, d_sae]``: the activation at each image token's prompt position, or on a
    vision hook the mean over the tower patches the token was built from."""
    if not hook_name.startswith("vision."):
        if acts.shape[1] != batch.input_ids.shape[1]:
            raise MMLensError(f"{hook_name} has {acts.shape[1]} positions, not the prompt's "
                              f"{batch.input_ids.shape[1]}: read image features at a hook on "
                              "the prompt's positions (blocks.*) or the vision tower's")
        return acts[example, positions].float()
    values = []
    for position in positions:
        spans = [{**s, "_token": torch.tensor([], dtype=torch.long)} for s in batch.spans]
        spans[example]["_token"] = torch.tensor([position])
        per_row = dataclasses.replace(batch, spans=spans).vision_positions("_token", model)
        values.append(torch.cat([acts[row, patches] for row, patches in enumerate(per_row)
                                 if len(patches)]).float().mean(0))
    return torch.stack(values)


@torch.no_grad()
def feature_flow(model: HookedModel, batch: MultimodalBatch, saes: Sequence[Any], *,
                 layers: Sequence[int], src: PositionSpec = "related",
                 dst: PositionSpec = "last", k: int = 10,
                 target: int | None = None) -> pd.DataFrame:
    """Per example: ``p_base``, ``p_knockout`` (``src -> dst`` blocked in ``layers``),
    ``p_features`` (each SAE's ``k`` features most active on ``src`` zeroed there),
    ``knockout`` and ``features`` (their changes of the target's probability), ``share`` (=
    features / knockout) and the ablated ``feature_ids`` per SAE hook."""
    saes = list(saes)
    if not saes:
        raise MMLensError("feature_flow needs at least one SAE (load_sae(...))")
    if k < 1:
        raise MMLensError(f"k must be at least 1, got {k}")
    on_tower = [sae.hook_name for sae in saes if sae.hook_name.startswith("vision.")]
    if on_tower:
        raise MMLensError(f"feature_flow ablates features at the prompt's src positions, but "
                          f"{on_tower[0]} is on the vision tower: use SAEs on blocks.* hooks")
    sources, targets_all = (_per_example(resolve_positions(spec, batch, role=role), len(batch))
                            for spec, role in ((src, "src"), (dst, "dst")))
    rows = []
    for i in range(len(batch)):
        one = batch.select(i)
        offset = batch.input_ids.shape[1] - one.input_ids.shape[1]
        source = sources[i] - offset
        targets = [targets_all[i] - offset]
        base = model(one)[0, -1].float().softmax(-1)
        token = int(base.argmax()) if target is None else target
        knocked = model.run_with_hooks(one, fwd_hooks=block_attention(
            [source], targets, list(layers), batch=one))[0, -1].float().softmax(-1)[token]
        with model.saes(saes, use_error_term=True):
            names = [f"{sae.hook_name}.hook_sae_acts_post" for sae in saes]
            _, cache = model.run_with_cache(one, names_filter=names)
            chosen = {sae.hook_name: cache[name][0, source].sum(0).topk(k).indices
                      for sae, name in zip(saes, names, strict=True)}
            hooks = [(name, _zero(source, chosen[sae.hook_name]))
                     for sae, name in zip(saes, names, strict=True)]
            ablated = model.run_with_hooks(one, fwd_hooks=hooks)[0, -1].float().softmax(-1)
        p_base, p_knock, p_feat = float(base[token]), float(knocked), float(ablated[token])
        knockout, features = p_knock - p_base, p_feat - p_base
        rows.append((i, token, p_base, p_knock, p_feat, knockout, features,
                     features / knockout if knockout else float("nan"),
                     {hook: ids.tolist() for hook, ids in chosen.items()}))
    return pd.DataFrame(rows, columns=["example", "target", "p_base", "p_knockout",
                                       "p_features", "knockout", "features", "share",
                                       "feature_ids"])


def _per_example(positions: Tensor | list[Tensor], n: int) -> list[Tensor]:
    return positions if isinstance(positions, list) else [positions] * n


def _zero(positions: Tensor, features: Tensor) -> Any:
    def hook(acts: Tensor, hook: Any) -> Tensor:
        acts = acts.clone()
        acts[:, positions[:, None], features[None, :]] = 0
        return acts

    return hook
