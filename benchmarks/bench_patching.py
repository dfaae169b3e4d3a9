"""Activation-patching sweeps: mmlens's resumed, stacked sweep vs one full forward per cell.

``patch_spans`` over every layer and three spans (image, question, last) of LLaVA-1.5's token
layout, random weights, one clean and one corrupted image; the naive loop re-encodes the image
and reruns every layer for each cell, as a hand-written TransformerLens loop would.

    python benchmarks/bench_patching.py                      # CPU, scaled-down widths, float32
    python benchmarks/bench_patching.py --device cuda --dtype bfloat16 --real-shapes
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import IMAGE_TOKEN, build_hf, llava_config, llava_inputs, sync

from mmlens import HookedMultimodalTransformer, MultimodalBatch
from mmlens.methods.patching import answer_prob_metric, patch_activation, patch_spans

SPANS = ("image", "question", "last")


def batch_of(inputs: dict[str, torch.Tensor], pixels: torch.Tensor) -> MultimodalBatch:
    ids = inputs["input_ids"]
    image = (ids[0] == IMAGE_TOKEN).nonzero()[:, 0]
    after = torch.arange(int(image[-1]) + 1, ids.shape[1], device=ids.device)
    spans = [{"image": image, "question": after[:-1], "last": after[-1:]}] * len(ids)
    return MultimodalBatch(input_ids=ids, attention_mask=torch.ones_like(ids),
                           pixel_values=pixels, spans=spans)


def naive(model, clean, corrupted, metric, layers) -> torch.Tensor:
    _, cache = model.run_with_cache(clean)
    scores = torch.zeros(len(layers), len(SPANS))
    for row, layer in enumerate(layers):
        name = f"blocks.{layer}.hook_resid_pre"
        for column, span in enumerate(SPANS):
            pairs = [(t, s) for s, t in zip(clean.span(span), corrupted.span(span), strict=True)]
            logits = model.run_with_hooks(corrupted,
                                          fwd_hooks=patch_activation(name, cache[name], pairs))
            scores[row, column] = float(metric(logits))
    return scores


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--real-shapes", action="store_true")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    dtype, device = getattr(torch, args.dtype), args.device
    torch.set_grad_enabled(False)
    config = llava_config(args.real_shapes)
    inputs = llava_inputs(device=device, dtype=dtype)
    model = HookedMultimodalTransformer.from_hf_model(build_hf(config, dtype, device, "sdpa"))
    clean = batch_of(inputs, inputs["pixel_values"])
    corrupted = batch_of(inputs, torch.randn_like(inputs["pixel_values"]))
    metric = answer_prob_metric(model(clean)[:, -1].argmax(-1).tolist())
    layers = list(range(model.cfg.n_layers))
    fast, fast_s = timed(lambda: patch_spans(model, clean, corrupted, metric, spans=SPANS,
                                             batch_size=args.batch_size), device)
    slow, slow_s = timed(lambda: naive(model, clean, corrupted, metric, layers), device)
    shapes = "LLaVA-1.5-7B shapes" if args.real_shapes else "scaled-down widths"
    n_cells = len(layers) * len(SPANS)
    print(f"\n{shapes}, {device}, {args.dtype}, {clean.input_ids.shape[1]} tokens, "
          f"{n_cells} cells ({len(layers)} layers x {len(SPANS)} spans)")
    rows = [
        (f"mmlens patch_spans (batch_size {args.batch_size}), s", f"{fast_s:9.3f}"),
        ("one full forward per cell, s", f"{slow_s:9.3f}"),
        ("naive / mmlens", f"{slow_s / fast_s:8.2f}x"),
        ("max |difference|", f"{(fast - slow).abs().max().item():9.2e}"),
    ]
    for label, value in rows:
        print(f"{label:44s} {value}")


if __name__ == "__main__":
    main()
