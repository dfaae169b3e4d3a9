"""Edge attribution against the exact knockout sweep, on the bundled ``shapes-llava``.

For ChooseAttr examples, every flow (image -> question, image -> last, question -> last) is
knocked out in every layer on its own (a window of one layer) by the study's exact engine
(``fast_knockout_probs``); its effect is ``p(answer | knockout) - p(answer)``. Each estimate of
``edge_attribution`` scores the same layers x flows cells: the linear estimate (``atp``),
AtP*'s saturation fix (``atp*``), AtP* with GradDrop (a magnitude: ranked against |effect|),
and integrated gradients with k steps. Reported per estimate, averaged over the examples:
Spearman rank correlation with the exact effects over all cells, how many of the 10 cells
with the largest |effect| are among its 10 largest |scores|, the largest absolute error
(signed estimates), and the time per example, all measured in this one run.

    python benchmarks/bench_edge_attribution.py --examples 4
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from mmlens import HookedMultimodalTransformer
from mmlens.data import shapes
from mmlens.experiments.engine import clean_run, fast_knockout_probs
from mmlens.experiments.knockouts import Knockout
from mmlens.methods.edge_attribution import EDGE_FLOWS, edge_attribution
from mmlens.methods.patching import answer_prob_metric

ESTIMATES = {
    "atp": dict(method="atp"),
    "atp*": dict(method="atp*"),
    "atp* + graddrop": dict(method="atp*", graddrop=True),
    "ig, 4 steps": dict(method="ig", steps=4),
    "ig, 16 steps": dict(method="ig", steps=16),
    "ig, 64 steps": dict(method="ig", steps=64),
}


def exact_effects(model, batch, answer: int) -> pd.Series:
    """The knockout effect of every (flow, layer), in ``edge_attribution``'s row order."""
    run = clean_run(model, batch)
    knockouts, index = [], []
    for flow in EDGE_FLOWS:
        source, target = flow.split("->")
        for layer in range(model.cfg.n_layers):
            knockouts.append(Knockout(batch.positions(source, 0), batch.positions(target, 0),
                                      (layer,)))
            index.append((flow, layer))
    probs = fast_knockout_probs(model, run, knockouts, answer)
    return pd.Series((probs - run.prob(answer)).tolist(),
                     index=pd.MultiIndex.from_tuples(index, names=["flow", "layer"]))


def agreement(scores: pd.Series, effects: pd.Series, magnitude: bool) -> dict[str, float]:
    target = effects.abs() if magnitude else effects
    top_exact = set(effects.abs().nlargest(10).index)
    top_estimate = set(scores.abs().nlargest(10).index)
    return {"spearman": float(scores.rank().corr(target.rank())),  # Pearson of ranks
            "top10": len(top_exact & top_estimate),
            "max_abs_error": float("nan") if magnitude else float((scores - effects).abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = HookedMultimodalTransformer.from_pretrained("shapes-llava")
    rows, sizes = [], []
    for seed in range(args.examples):
        example = shapes.generate_one("ChooseAttr", 0, seed=seed)
        batch = model.prepare(example.load_image(), example.question)
        answer = model.to_single_token(example.answer.capitalize())
        start = time.perf_counter()
        effects = exact_effects(model, batch, answer)
        rows.append({"estimate": "exact sweep", "seconds": time.perf_counter() - start,
                     "spearman": 1.0, "top10": 10, "max_abs_error": 0.0})
        sizes.append(float(effects.abs().max()))
        for label, kwargs in ESTIMATES.items():
            start = time.perf_counter()
            frame = edge_attribution(model, batch, answer_prob_metric(answer), **kwargs)
            seconds = time.perf_counter() - start
            scores = frame.set_index(["flow", "layer"])["score"]
            rows.append({"estimate": label, "seconds": seconds,
                         **agreement(scores, effects, magnitude="graddrop" in label)})
    table = pd.DataFrame(rows).groupby("estimate", sort=False).agg(
        spearman_mean=("spearman", "mean"), spearman_min=("spearman", "min"),
        top10_overlap=("top10", "mean"), max_abs_error=("max_abs_error", "max"),
        seconds_per_example=("seconds", "mean"))
    print(f"\nshapes-llava, {args.examples} ChooseAttr examples, cpu, {args.threads} thread(s); "
          f"{len(EDGE_FLOWS)} flows x {model.cfg.n_layers} layers = "
          f"{len(EDGE_FLOWS) * model.cfg.n_layers} cells, metric p(answer); largest exact "
          f"|effect| per example {min(sizes):.3f}..{max(sizes):.3f}")
    print(table.round(4).to_string())


if __name__ == "__main__":
    main()
