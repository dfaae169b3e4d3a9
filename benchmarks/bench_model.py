"""Forward and full run_with_cache: mmlens vs Hugging Face (sdpa, eager) vs TL's TransformerBridge.

Same random weights, LLaVA-1.5's token layout (576 image tokens + a 40-token prompt), measured
side by side in one run. Widths are scaled down on CPU; ``--real-shapes`` uses LLaVA-1.5-7B's.

    python benchmarks/bench_model.py                      # CPU, scaled-down widths, float32
    python benchmarks/bench_model.py --device cuda --dtype bfloat16 --real-shapes
"""

from __future__ import annotations

import argparse

import torch
from _bridge import boot_bridge
from _common import build_hf, llava_config, llava_inputs, measure

from mmlens import HookedMultimodalTransformer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--real-shapes", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-bridge", action="store_true")
    args = parser.parse_args()
    dtype, device = getattr(torch, args.dtype), args.device
    torch.set_grad_enabled(False)
    config = llava_config(args.real_shapes)
    inputs = llava_inputs(device=device, dtype=dtype)
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]

    hf = build_hf(config, dtype, device, attn="sdpa")
    ours = HookedMultimodalTransformer.from_hf_model(hf)  # shares hf's weights
    rows = {}
    rows["mmlens forward"] = measure(lambda: ours(ids, pixels), device, args.repeats)
    rows["HF sdpa forward"] = measure(lambda: hf(**inputs), device, args.repeats)
    rows["mmlens run_with_cache (all hooks)"] = measure(
        lambda: ours.run_with_cache(ids, pixels), device, args.repeats)
    hf.set_attn_implementation("eager")
    rows["HF eager forward"] = measure(lambda: hf(**inputs), device, args.repeats)
    rows["HF eager + hidden states + attentions"] = measure(
        lambda: hf(**inputs, output_hidden_states=True, output_attentions=True), device,
        args.repeats)
    bridge, why = boot_bridge(hf, dtype, device) if not args.no_bridge else (None, "--no-bridge")
    if bridge is None:
        print(f"TL bridge skipped: {why}")
    else:
        rows["TL bridge forward"] = measure(lambda: bridge(ids, pixel_values=pixels), device,
                                            args.repeats)
        rows["TL bridge run_with_cache"] = measure(
            lambda: bridge.run_with_cache(ids, pixel_values=pixels), device, args.repeats)

    shapes = "LLaVA-1.5-7B shapes" if args.real_shapes else "scaled-down widths"
    print(f"\n{shapes}, {device}, {args.dtype}, {ids.shape[1]} tokens (576 image)")
    print(f"{'':42s} {'seconds':>9s} {'peak MiB':>9s}")
    for name, (seconds, mib) in rows.items():
        print(f"{name:42s} {seconds:9.4f} {mib:9.1f}")
    ratios = [("mmlens forward / HF sdpa forward", "mmlens forward", "HF sdpa forward")]
    if bridge is not None:
        ratios += [("mmlens run_with_cache / TL bridge run_with_cache",
                    "mmlens run_with_cache (all hooks)", "TL bridge run_with_cache"),
                   ("HF eager forward / TL bridge run_with_cache", "HF eager forward",
                    "TL bridge run_with_cache")]
    for label, a, b in ratios:
        print(f"{label:58s} {rows[a][0] / rows[b][0]:6.2f}x")


if __name__ == "__main__":
    main()
