"""Information-flow sweep per example: the fast engine vs one full forward per knockout.

All six default flows over every centre layer, at LLaVA-1.5's token layout (35 tokens before
the image, 576 image tokens, 30 after: a 12-token question, the instruction, the last
position), random weights, side by side in one run: wall time, peak extra memory, and the
largest |p_block| difference between the two paths.

    python benchmarks/bench_flow.py --threads 1                       # CPU, scaled-down widths
    python benchmarks/bench_flow.py --device cuda --dtype bfloat16 --real-shapes --naive-layers 4

``--naive-layers N`` runs the naive path for N centre layers only (spread over the depth) and
extrapolates its time to all layers; the difference is taken over those layers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from _common import IMAGE_TOKEN, PeakMemory, build_hf, llava_config, sync

from mmlens import HookedMultimodalTransformer
from mmlens.experiments import DEFAULT_FLOWS, default_window, parse_flows
from mmlens.experiments.engine import clean_run, fast_knockout_probs
from mmlens.experiments.knockouts import window_knockouts
from mmlens.experiments.naive import naive_knockout_probs
from mmlens.inputs.batch import MultimodalBatch

BEFORE_IMAGE, AFTER_IMAGE, QUESTION = 35, 30, 12


def layout_batch(device: str, dtype: torch.dtype, seed: int = 0) -> MultimodalBatch:
    """One prompt ``[bos, system, 576 image, newline, question, instruction]`` with all spans."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.tensor([1]), torch.randint(3, 32000, (BEFORE_IMAGE - 1,), generator=gen),
                     torch.full((576,), IMAGE_TOKEN),
                     torch.randint(3, 32000, (AFTER_IMAGE,), generator=gen)])[None]
    image = torch.arange(BEFORE_IMAGE, BEFORE_IMAGE + 576)
    grid = image.reshape(24, 24)
    related = grid[8:14, 10:16].flatten()  # a 6 x 6 patch object
    spans = {
        "image": image,
        "question": torch.arange(image[-1] + 2, image[-1] + 2 + QUESTION),
        "last": torch.tensor([ids.shape[1] - 1]),
        "related": related,
        "other": image[~torch.isin(image, related)],
    }
    pixels = torch.randn(1, 3, 336, 336, generator=gen)
    return MultimodalBatch(ids.to(device), torch.ones_like(ids).to(device),
                           pixels.to(device, dtype), [spans])


def timed(fn, device: str) -> tuple[object, float]:
    """(result, seconds) of one call."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def run_path(args: argparse.Namespace) -> dict:
    """One path in this (fresh) process: peak memory of its first call, then its time."""
    dtype = getattr(torch, args.dtype)
    config = llava_config(args.real_shapes, args.layers)
    model = HookedMultimodalTransformer.from_hf_model(build_hf(config, dtype, args.device)).eval()
    n_layers = model.cfg.n_layers
    window = default_window(n_layers)
    batch = layout_batch(args.device, dtype)
    cells = window_knockouts(parse_flows(DEFAULT_FLOWS), batch.spans[0], window, n_layers)
    centres = list(range(n_layers))
    if args.naive_layers and args.path == "naive":
        step = max(1, n_layers // args.naive_layers)
        centres = list(range(0, n_layers, step))[:args.naive_layers]
    chosen = [i for i, cell in enumerate(cells) if cell.layer in centres]
    knockouts = [cells[i].knockout for i in chosen]

    def fast():
        clean = clean_run(model, batch)
        token = clean.prediction(exclude=IMAGE_TOKEN)
        return fast_knockout_probs(model, clean, knockouts, token, batch_size=args.batch_size)

    def naive():
        clean = clean_run(model, batch)  # the unmodified run, as the fast path does
        token = clean.prediction(exclude=IMAGE_TOKEN)
        return naive_knockout_probs(model, batch, knockouts, token)

    path = fast if args.path == "fast" else naive
    with torch.no_grad():
        with PeakMemory(args.device) as memory:  # first call: nothing cached by earlier calls
            probs, seconds = timed(path, args.device)
        if args.path == "fast":
            seconds = min(timed(path, args.device)[1] for _ in range(3))
    return {"seconds": seconds * len(cells) / len(chosen), "peak_mib": memory.peak / 2**20,
            "probs": probs.tolist(), "chosen": chosen, "n_cells": len(cells), "window": window,
            "describe": f"{n_layers} layers, d_model {model.cfg.d_model}, "
                        f"{model.cfg.n_heads} heads, vision {model.cfg.vision.n_layers} blocks x "
                        f"{model.cfg.vision.d_model}, {args.dtype} on {args.device}, "
                        f"{batch.input_ids.shape[1]} positions, window {window}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--real-shapes", action="store_true",
                        help="LLaVA-1.5-7B's widths: 32 layers, d_model 4096, CLIP-L")
    parser.add_argument("--layers", type=int, default=None, help="language layers")
    parser.add_argument("--naive-layers", type=int, default=None,
                        help="run the naive path on this many centre layers, extrapolate")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (1 avoids stalls when other work shares the cores)")
    parser.add_argument("--path", choices=["fast", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.path:
        print(json.dumps(run_path(args)))
        return
    # Each path in its own process, so neither inherits memory the other left cached.
    results = {}
    for path in ("fast", "naive"):
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--path", path],
                               capture_output=True, text=True, check=True)
        results[path] = json.loads(child.stdout.strip().splitlines()[-1])
    fast, naive = results["fast"], results["naive"]
    fast_probs = torch.tensor(fast["probs"])[naive["chosen"]]
    diff = (fast_probs - torch.tensor(naive["probs"])).abs().max().item()
    n_naive = len(naive["chosen"])
    print(f"model: {fast['describe']}")
    print(f"knockouts per example: {fast['n_cells']} ({len(DEFAULT_FLOWS)} flows x every layer)"
          + (f"; naive ran {n_naive}, its time extrapolated" if n_naive < fast["n_cells"]
             else ""))
    print(f"{'path':8}{'s / example':>14}{'examples / s':>15}{'peak MiB':>11}")
    for name in ("fast", "naive"):
        seconds, mib = results[name]["seconds"], results[name]["peak_mib"]
        print(f"{name:8}{seconds:14.3f}{1 / seconds:15.3f}{mib:11.0f}")
    print(f"speed-up: {naive['seconds'] / fast['seconds']:.1f}x; peak memory fast / naive: "
          f"{fast['peak_mib'] / max(naive['peak_mib'], 1e-9):.2f}; "
          f"max |p_block fast - naive|: {diff:.2e}")


if __name__ == "__main__":
    main()
