"""mmlens vs Hugging Face vs TransformerLens's TransformerBridge on OneVision, Qwen2.5-VL, Gemma 3.

One run times, side by side on the same random weights, a forward and a full
``run_with_cache`` of mmlens, of the HF model (sdpa; eager with hidden states and attentions as
HF's nearest to a cache) and of TransformerLens 4's bridge wrapping a copy of that HF model
(booting swaps the bridge's wrappers into the model it wraps), and checks how far each one's
logits are from HF's. The calls are timed in turn, round after round (median of
``--repeats``), so a change of load on a shared machine weighs on every column alike. The
shapes are those of ``bench_onevision.py`` (2260 positions, 2214 image tokens) and
``bench_qwen.py`` (191 positions, 144 image tokens) and ``bench_gemma3.py`` (96 positions, 64
pooled image tokens, a 32-token sliding window), scaled-down widths unless ``--real-shapes``.

    python benchmarks/bench_bridge.py --threads 1 --repeats 5      # every family, CPU
    python benchmarks/bench_bridge.py --threads 1 --family qwen2_5_vl
    python benchmarks/bench_bridge.py --device cuda --dtype bfloat16 --real-shapes

Without the bridge (``--no-bridge``, or a TransformerLens without ``model_bridge``) its
columns are skipped with the reason; when the bridge cannot wrap a family the exception text
is printed instead of a number.

Run it in a venv of its own, never the development one: TransformerLens's bridge needs
torchvision for Qwen2.5-VL and pip-installs it at boot when it is missing (``_bridge.py``
refuses that), and PyPI's torchvision wheels are built against CUDA torch
(beside a CPU build of torch, ``import torchvision`` fails with "operator torchvision::nms
does not exist"). Two venvs, both from pinned versions:

    # torch 2.13 CPU build (the tests' torch); Qwen2.5-VL's bridge column reports torchvision
    python -m venv /work/bench-venv
    /work/bench-venv/bin/pip install torch==2.13.0          # CPU build first, so it stays
    /work/bench-venv/bin/pip install transformers==5.25.0 transformer_lens==4.3.0 psutil
    /work/bench-venv/bin/pip install -e .

    # torch 2.14.1 with its matching torchvision 0.29.1 (CUDA builds, ~5.5 GB): every column
    python -m venv /work/bench-venv-tv
    /work/bench-venv-tv/bin/pip install torch==2.14.1 torchvision==0.29.1 \\
        transformers==5.25.0 transformer_lens==4.3.0 psutil
    /work/bench-venv-tv/bin/pip install -e .
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import torch
from _bridge import boot_bridge
from _common import PeakMemory, sync
from transformers import (
    Gemma3ForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
)

from mmlens import HookedMultimodalTransformer
from mmlens.inputs.batch import MultimodalBatch

FAMILIES = ("onevision", "qwen2_5_vl", "gemma3")


@dataclass
class Case:
    """One family's HF model, mmlens model on the same weights, and the inputs each takes."""

    title: str
    hf: torch.nn.Module
    model: HookedMultimodalTransformer
    batch: MultimodalBatch
    hf_inputs: dict[str, torch.Tensor]
    bridge_kwargs: dict[str, torch.Tensor]  # everything but input_ids


def onevision_case(real_shapes: bool, device: str, dtype: torch.dtype) -> Case:
    from bench_onevision import layout_batch, onevision_config

    torch.manual_seed(0)
    hf = LlavaOnevisionForConditionalGeneration(onevision_config(real_shapes))
    hf = hf.to(device, dtype).eval()
    hf.set_attn_implementation("sdpa")
    model = HookedMultimodalTransformer.from_hf_model(hf)  # shares hf's weights
    batch = layout_batch(model, device, dtype)
    kwargs = dict(pixel_values=batch.pixel_values, image_sizes=batch.image_sizes)
    title = (f"LLaVA-OneVision: {batch.input_ids.shape[1]} positions "
             f"({len(batch.positions('image', 0))} image), {model.cfg.n_layers} layers x "
             f"d_model {model.cfg.d_model}, SigLIP {model.cfg.vision.n_layers} x "
             f"{model.cfg.vision.d_model} on {batch.pixel_values.shape[1]} tiles")
    return Case(title, hf, model, batch, dict(input_ids=batch.input_ids, **kwargs), kwargs)


def qwen_case(real_shapes: bool, device: str, dtype: torch.dtype) -> Case:
    from bench_qwen import IMAGE_TOKEN, config, layout

    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(config(real_shapes)).to(device, dtype).eval()
    hf.set_attn_implementation("sdpa")
    model = HookedMultimodalTransformer.from_hf_model(hf).eval()
    batch = layout(device, dtype)
    kwargs = dict(attention_mask=batch.attention_mask, pixel_values=batch.pixel_values[0],
                  image_grid_thw=batch.image_sizes,
                  mm_token_type_ids=(batch.input_ids == IMAGE_TOKEN).int())
    title = (f"Qwen2.5-VL: {batch.input_ids.shape[1]} positions "
             f"({len(batch.positions('image', 0))} image), {model.cfg.n_layers} layers x "
             f"d_model {model.cfg.d_model}, vision {model.cfg.vision.n_layers} x "
             f"{model.cfg.vision.d_model}")
    return Case(title, hf, model, batch, dict(input_ids=batch.input_ids, **kwargs), kwargs)


def gemma3_case(real_shapes: bool, device: str, dtype: torch.dtype) -> Case:
    from bench_gemma3 import IMAGE_TOKEN, config, layout

    torch.manual_seed(0)
    cfg = config(real_shapes)
    hf = Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():  # the projector and norms start at zero: make them matter
        for param in hf.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    hf = hf.to(device, dtype).eval()
    hf.set_attn_implementation("sdpa")
    model = HookedMultimodalTransformer.from_hf_model(hf).eval()
    batch = layout(cfg, device, dtype)
    kwargs = dict(attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                  token_type_ids=(batch.input_ids == IMAGE_TOKEN).long())
    title = (f"Gemma 3: {batch.input_ids.shape[1]} positions "
             f"({len(batch.positions('image', 0))} image), {model.cfg.n_layers} layers x "
             f"d_model {model.cfg.d_model}, window {cfg.text_config.sliding_window}, SigLIP "
             f"{model.cfg.vision.n_layers} x {model.cfg.vision.d_model}")
    return Case(title, hf, model, batch, dict(input_ids=batch.input_ids, **kwargs), kwargs)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def n_patterns(cache) -> str:
    names = list(cache.keys())
    return f"{len(names)} tensors, {sum('pattern' in name for name in names)} attention patterns"


def interleaved(fns: dict[str, Callable[[], object]], device: str,
                repeats: int) -> dict[str, tuple[float, float]]:
    """Median seconds and peak extra MiB of each call, the calls taken in turn each round: on a
    machine shared with other jobs a change of load then weighs on every column alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    peaks = {}
    for name, fn in fns.items():
        with PeakMemory(device) as mem:
            fn()
            sync(device)
        peaks[name] = mem.peak / 2**20
    return {name: (statistics.median(times[name]), peaks[name]) for name in fns}


def hf_with_states(hf: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> object:
    """HF's nearest to a cache: eager attention returning hidden states and attentions."""
    hf.set_attn_implementation("eager")
    try:
        return hf(**inputs, output_hidden_states=True, output_attentions=True)
    finally:
        hf.set_attn_implementation("sdpa")


def bench(case: Case, device: str, dtype: torch.dtype, repeats: int, use_bridge: bool) -> None:
    hf, model, batch, ids = case.hf, case.model, case.batch, case.batch.input_ids
    # Booting swaps the wrapped model's submodules for the bridge's wrappers in place, so the
    # bridge wraps a copy (same weights) and ``hf`` stays plain Hugging Face.
    bridge, why = boot_bridge(copy.deepcopy(hf), dtype, device) if use_bridge else (
        None, "--no-bridge")
    fns = {
        "mmlens forward": lambda: model(batch),
        "HF sdpa forward": lambda: hf(**case.hf_inputs),
        "mmlens run_with_cache (every hook)": lambda: model.run_with_cache(batch),
        "HF eager + hidden states + attentions": lambda: hf_with_states(hf, case.hf_inputs),
    }
    if bridge is not None:
        fns["TL bridge forward"] = lambda: bridge(ids, **case.bridge_kwargs)
        fns["TL bridge run_with_cache"] = lambda: bridge.run_with_cache(ids, **case.bridge_kwargs)
    rows = interleaved(fns, device, repeats)

    print(f"{'':42s} {'seconds':>9s} {'peak MiB':>9s}")
    for name, (seconds, mib) in rows.items():
        print(f"{name:42s} {seconds:9.4f} {mib:9.0f}")
    if bridge is None:
        print(f"TL bridge skipped: {why}")
    ratios = [("mmlens forward / HF sdpa forward", "mmlens forward", "HF sdpa forward")]
    if bridge is not None:
        ratios += [
            ("TL bridge forward / HF sdpa forward", "TL bridge forward", "HF sdpa forward"),
            ("mmlens forward / TL bridge forward", "mmlens forward", "TL bridge forward"),
            ("mmlens run_with_cache / TL bridge run_with_cache",
             "mmlens run_with_cache (every hook)", "TL bridge run_with_cache")]
    for label, a, b in ratios:
        print(f"{label:52s} {rows[a][0] / rows[b][0]:6.2f}x")

    # One more pass of each, outside the timings: do the logits agree?
    reference = hf(**case.hf_inputs).logits
    ours = model(batch)
    print(f"max |logits mmlens - HF|: {max_diff(ours, reference):.2e}")
    logits, cache = model.run_with_cache(batch)
    print(f"max |logits mmlens run_with_cache - HF|: {max_diff(logits, reference):.2e}; "
          f"mmlens cache: {n_patterns(cache)}")
    del logits, cache
    if bridge is not None:
        theirs = bridge(ids, **case.bridge_kwargs)
        print(f"max |logits TL bridge - HF|: {max_diff(theirs, reference):.2e}; "
              f"max |logits TL bridge - mmlens|: {max_diff(theirs, ours):.2e}")
        del theirs
        logits, cache = bridge.run_with_cache(ids, **case.bridge_kwargs)
        print(f"max |logits TL bridge run_with_cache - HF|: {max_diff(logits, reference):.2e}; "
              f"TL bridge cache: {n_patterns(cache)}")


def installed(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=[*FAMILIES, "all"], default="all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--real-shapes", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-bridge", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, transformers {installed('transformers')}, "
          f"transformer_lens {installed('transformer_lens')}, torchvision "
          f"{installed('torchvision')}; {args.device} ({platform.machine()}, "
          f"{torch.get_num_threads()} threads), {args.dtype}, "
          f"{'real' if args.real_shapes else 'scaled-down'} widths, median of {args.repeats}")
    builders = {"onevision": onevision_case, "qwen2_5_vl": qwen_case, "gemma3": gemma3_case}
    for family in FAMILIES if args.family == "all" else [args.family]:
        case = builders[family](args.real_shapes, args.device, dtype)
        print(f"\n{case.title}")
        bench(case, args.device, dtype, args.repeats, not args.no_bridge)
        del case


if __name__ == "__main__":
    main()
