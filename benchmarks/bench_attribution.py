"""How well attribution patching ranks cells compared with real activation patching.

On the bundled ``shapes-llava``: for ChooseAttr examples, the clean image and the same scene
with the asked-about object recoloured to the wrong answer (same prompt, the opposite answer).
Metric: logit difference right - wrong at the last position. Real patching copies one cell
from clean into corrupted (``patch_positions`` / ``patch_heads``; the vision tower by a plain
loop); its effect is ``metric(patched) - metric(corrupted)``. Attribution patching estimates
all of them from one backward pass. Reported per activation: Spearman rank correlation over
all cells (and over the cells where the two runs differ at all), and how many of the 10
cells with the largest real |effect| are among the 10 with the largest |score|.

    python benchmarks/bench_attribution.py --examples 4
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import pandas as pd
import torch

from mmlens import HookedMultimodalTransformer
from mmlens.data import shapes
from mmlens.methods.patching import (
    attribution_patching,
    logit_diff_metric,
    patch_heads,
    patch_positions,
)


def pair(model, seed: int):
    example = shapes.generate_one("ChooseAttr", 0, seed=seed)
    subject = example.subjects[0]
    recoloured = [dataclasses.replace(obj, color=example.wrong_answer) if i == subject else obj
                  for i, obj in enumerate(example.objects)]
    image = example.load_image()
    background = max(image.getcolors(image.width * image.height))[1]
    corrupted_image = shapes.draw_scene(recoloured, image.width, background)
    clean = model.prepare(image, example.question)
    corrupted = model.prepare(corrupted_image, example.question)
    right = model.to_single_token(example.answer.capitalize())
    wrong = model.to_single_token(example.wrong_answer.capitalize())
    return clean, corrupted, logit_diff_metric(right, wrong)


def vision_patching(model, clean, corrupted, metric, baseline: float) -> torch.Tensor:
    """Real patching of the vision tower's residual stream, one (layer, position) per forward."""
    n_layers, n_pos = model.cfg.vision.n_layers, model.cfg.vision.n_patches + 1
    names = [f"vision.blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]
    _, cache = model.run_with_cache(clean, names_filter=lambda name: name in names)
    effects = torch.zeros(n_layers, n_pos)
    for layer, name in enumerate(names):
        for pos in range(n_pos):
            def patch(activation, hook, pos=pos, name=name):
                activation = activation.clone()
                activation[:, pos] = cache[name][:, pos]
                return activation

            effects[layer, pos] = float(metric(model.run_with_hooks(
                corrupted, fwd_hooks=[(name, patch)]))) - baseline
    return effects


def agreement(scores: pd.Series, effects: pd.Series) -> tuple[float, float, int]:
    """Spearman over all cells; over the cells where clean and corrupted differ at all
    (positions before the image are identical in both runs and score exactly 0 in both,
    which would flatter the first); top-10 overlap."""
    spearman = float(scores.rank().corr(effects.rank()))  # Pearson of ranks, no scipy
    moved = (scores.abs() > 1e-7) | (effects.abs() > 1e-7)
    spearman_moved = float(scores[moved].rank().corr(effects[moved].rank()))
    top_real = set(effects.abs().nlargest(10).index)
    top_attr = set(scores.abs().nlargest(10).index)
    return spearman, spearman_moved, len(top_real & top_attr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = HookedMultimodalTransformer.from_pretrained("shapes-llava")
    rows = []
    timing = {"attribution": 0.0, "patching": 0.0}
    for seed in range(args.examples):
        clean, corrupted, metric = pair(model, seed)
        with torch.no_grad():
            baseline = float(metric(model(corrupted)))
        start = time.perf_counter()
        frame = attribution_patching(model, clean, corrupted, metric,
                                     names=["resid_pre", "attn_out", "mlp_out", "z",
                                            "vision_resid_pre"])
        timing["attribution"] += time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            real = {name: patch_positions(model, clean, corrupted, metric, component=name)
                    - baseline for name in ("resid_pre", "attn_out", "mlp_out")}
            real["z"] = patch_heads(model, clean, corrupted, metric, by_position=True) - baseline
            real["vision_resid_pre"] = vision_patching(model, clean, corrupted, metric,
                                                       baseline)
        timing["patching"] += time.perf_counter() - start
        for name, effects in real.items():
            scores = frame[frame["name"] == name]["score"].reset_index(drop=True)
            effects = pd.Series(effects.reshape(-1).tolist())
            spearman, moved, overlap = agreement(scores, effects)
            rows.append({"example": seed, "name": name, "cells": len(scores),
                         "spearman": spearman, "spearman_moved": moved,
                         "top10_overlap": overlap})
    table = pd.DataFrame(rows)
    summary = table.groupby("name", sort=False).agg(
        cells=("cells", "first"), spearman_mean=("spearman", "mean"),
        spearman_min=("spearman", "min"), spearman_moved_mean=("spearman_moved", "mean"),
        top10_overlap_mean=("top10_overlap", "mean"))
    print(f"\nshapes-llava, {args.examples} ChooseAttr pairs (object recoloured), cpu, "
          f"{args.threads} thread(s)")
    print(summary.round(3).to_string())
    print(f"attribution patching {timing['attribution']:.1f} s in all; real patching of the "
          f"same cells {timing['patching']:.1f} s")


if __name__ == "__main__":
    main()
