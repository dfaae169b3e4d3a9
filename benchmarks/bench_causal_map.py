"""Causal image maps: every image token knocked out in one batched pass vs one forward per token.

On the bundled ``shapes-llava`` (64 image tokens, 8 layers), ``causal_map(dst="last")`` over a
window of layers for a few examples, two ways, same numbers: one full forward per region
(``block_attention`` + ``run_with_hooks``, the image encoded each time) and ``causal_map``
(one clean run per example, the regions' variants resumed together from the window's first
layer at the last position). Prints both timings side by side, their ratio and the largest
difference.

    python benchmarks/bench_causal_map.py [--threads 1] [--device cpu] [--examples 4]
"""

from __future__ import annotations

import argparse

import torch
from bench_batched_patching import timed

from mmlens import HookedMultimodalTransformer
from mmlens.data.shapes import generate_per_task
from mmlens.inputs.prepare import prepare_examples
from mmlens.methods import block_attention, causal_map, window_layers


def one_forward_per_region(model, batch, frame, layers) -> torch.Tensor:
    probs = []
    tokens = {}
    for example, positions in zip(frame.example, frame.position, strict=True):
        one = batch.select(int(example))
        offset = batch.input_ids.shape[1] - one.input_ids.shape[1]
        if example not in tokens:
            tokens[example] = int(model(one)[0, -1].argmax())
        hooks = block_attention([[p - offset for p in positions]], "last", layers, batch=one)
        logits = model.run_with_hooks(one, fwd_hooks=hooks)[0, -1].float()
        probs.append(float(logits.softmax(-1)[tokens[example]]))
    return torch.tensor(probs, dtype=torch.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = HookedMultimodalTransformer.from_pretrained("shapes-llava", device=args.device)
    examples = generate_per_task(args.examples, seed=11, tasks=["ChooseAttr"])
    batch = prepare_examples(model, examples).to(args.device)
    layers = window_layers(3, 3, model.cfg.n_layers)
    causal_map(model, batch.select(0), layers=layers)  # warm-up
    frame, fast_s = timed(lambda: causal_map(model, batch, layers=layers,
                                             batch_size=args.batch_size), args.device)
    naive, naive_s = timed(lambda: one_forward_per_region(model, batch, frame, layers),
                           args.device)
    n = len(frame)
    print(f"\nshapes-llava, {args.device}, {args.threads} thread(s), dst='last', layers "
          f"{layers}, {args.examples} examples x {n // args.examples} regions = {n} knockouts")
    for label, seconds in (("one full forward per region", naive_s),
                           (f"causal_map, batch_size {args.batch_size}", fast_s)):
        print(f"{label:36s} {seconds:8.2f} s  {1000 * seconds / n:7.2f} ms/region")
    print(f"{'speed-up':36s} {naive_s / fast_s:8.1f}x")
    difference = (torch.tensor(frame.p_block.to_numpy()) - naive).abs().max()
    print(f"{'max |p difference| vs one forward':36s} {float(difference):.2e}")


if __name__ == "__main__":
    main()
