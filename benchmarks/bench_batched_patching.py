"""Batched activation patching: many (layer, position) cells per forward vs one per forward.

On the bundled ``shapes-llava``, ``patch_positions`` over every layer and every position of
one prompt (``resid_pre``, one ChooseAttr pair: the object recoloured). Three ways, same
numbers: one full forward per cell (a hand-written loop), ``batch_size=1`` (one cell per
forward, resumed from the corrupted run at the cell's layer and first position) and the
batched sweep (``batch_size`` cells stacked in one forward). Each is timed ``--repeats``
times, interleaved, and the fastest run kept (the CPU may be shared).

    python benchmarks/bench_batched_patching.py [--threads 1] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_attribution import pair

from mmlens import HookedMultimodalTransformer
from mmlens.methods.patching import patch_activation, patch_positions


def one_forward_per_cell(model, clean, corrupted, metric) -> torch.Tensor:
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(clean, names_filter=lambda name: name in names)
    n_pos = clean.input_ids.shape[1]
    scores = torch.zeros(len(names), n_pos)
    for layer, name in enumerate(names):
        for pos in range(n_pos):
            at = torch.tensor([pos])
            hooks = patch_activation(name, cache[name], [(at, at)])
            scores[layer, pos] = float(metric(model.run_with_hooks(corrupted, fwd_hooks=hooks)))
    return scores


def timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = HookedMultimodalTransformer.from_pretrained("shapes-llava", device=args.device)
    clean, corrupted, metric = pair(model, 0)
    clean, corrupted = clean.to(args.device), corrupted.to(args.device)
    runs = {
        "naive": lambda: one_forward_per_cell(model, clean, corrupted, metric),
        "single": lambda: patch_positions(model, clean, corrupted, metric, batch_size=1),
        "batched": lambda: patch_positions(model, clean, corrupted, metric,
                                           batch_size=args.batch_size),
    }
    seconds = {label: float("inf") for label in runs}
    results = {}
    for _ in range(args.repeats):
        for label, run in runs.items():
            results[label], took = timed(run, args.device)
            seconds[label] = min(seconds[label], took)
    naive, single, batched = results["naive"], results["single"], results["batched"]
    naive_s, single_s, batched_s = seconds["naive"], seconds["single"], seconds["batched"]
    n_cells = naive.numel()
    print(f"\nshapes-llava, {args.device}, {args.threads} thread(s), fastest of {args.repeats}, "
          "resid_pre, "
          f"{n_cells} cells ({naive.shape[0]} layers x {naive.shape[1]} positions)")
    for label, seconds in (("one full forward per cell", naive_s),
                           ("patch_positions, batch_size 1 (resumed)", single_s),
                           (f"patch_positions, batch_size {args.batch_size}", batched_s)):
        print(f"{label:44s} {seconds:8.2f} s  {1000 * seconds / n_cells:7.2f} ms/cell  "
              f"{naive_s / seconds:6.2f}x")
    print(f"{'max |difference| vs one forward per cell':44s} "
          f"{max((single - naive).abs().max(), (batched - naive).abs().max()):.2e}")


if __name__ == "__main__":
    main()
