"""Shared pieces of the benchmark scripts: model shapes, timing, peak memory."""

from __future__ import annotations

import argparse
import gc
import statistics
import threading
import time
from collections.abc import Callable

import psutil
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 32000


def llava_config(real_shapes: bool, n_text_layers: int | None = None) -> LlavaConfig:
    """LLaVA-1.5-7B's layout (CLIP 336/14 -> 576 image tokens); widths scaled down unless real."""
    if real_shapes:
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                      num_attention_heads=16)
        text = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32)
    else:
        vision = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                      num_attention_heads=4)
        text = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=8)
    if n_text_layers is not None:
        text["num_hidden_layers"] = n_text_layers
    return LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=336, patch_size=14, projection_dim=768,
                                       **vision),
        text_config=LlamaConfig(vocab_size=32064, max_position_embeddings=4096, **text),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def build_hf(config: LlavaConfig, dtype: torch.dtype, device: str,
             attn: str = "sdpa") -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn,
                                                           dtype=dtype)
    return model.eval()


def llava_inputs(batch: int = 1, n_text: int = 40, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """``[bos, 34 system tokens, 576 image tokens, n_text - 35 question/suffix tokens]``."""
    gen = torch.Generator().manual_seed(seed)
    before = 35
    ids = torch.cat([torch.tensor([1]), torch.randint(3, 32000, (before - 1,), generator=gen),
                     torch.full((576,), IMAGE_TOKEN),
                     torch.randint(3, 32000, (n_text - before,), generator=gen)])
    ids = ids[None].expand(batch, -1).clone()
    pixels = torch.randn(batch, 3, 336, 336, generator=gen)
    return {"input_ids": ids.to(device), "pixel_values": pixels.to(device, dtype)}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory above the starting point: CUDA allocator on GPU, sampled RSS on CPU."""

    def __init__(self, device: str):
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.proc = psutil.Process()
            self.start = self.proc.memory_info().rss
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss - self.start)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        if self.device.startswith("cuda"):
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.proc.memory_info().rss - self.start)


def clock(device: str) -> Callable[[], float]:
    """What timings read: on CPU at one thread the process's CPU time (on a shared machine
    the wall clock also counts the other processes' load), else the wall clock."""
    if device == "cpu" and torch.get_num_threads() == 1:
        return time.process_time
    return time.perf_counter


def measure(fn: Callable[[], object], device: str, repeats: int = 5,
            warmup: int = 1) -> tuple[float, float]:
    """Median seconds per call and peak extra memory (MiB) of one call."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        sync(device)
        times, now = [], clock(device)
        for _ in range(repeats):
            start = now()
            fn()
            sync(device)
            times.append(now() - start)
        with PeakMemory(device) as mem:
            fn()
            sync(device)
    return statistics.median(times), mem.peak / 2**20


def timed(fn: Callable[[], object], device: str, repeats: int = 1) -> tuple[object, float]:
    """The result of ``fn`` and its best time over ``repeats`` calls, in seconds."""
    best, now = float("inf"), clock(device)
    for _ in range(repeats):
        sync(device)
        start = now()
        result = fn()
        sync(device)
        best = min(best, now() - start)
    return result, best


def forward_table(runs: dict[str, Callable[[], object]], device: str, rounds: int = 3,
                  baseline: str = "HF sdpa forward") -> dict[str, tuple[object, float]]:
    """Time each run in alternated rounds after a warm-up, best of each (on a shared machine
    the load drifts between blocks of one run), and print a line per run with its ratio to
    ``baseline``. Returns each run's result and best seconds."""
    results = {name: fn() for name, fn in runs.items()}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, fn in runs.items():
            results[name], seconds = timed(fn, device)
            best[name] = min(best[name], seconds)
    print(f"forward, best of {rounds} alternated rounds "
          f"({'CPU time' if clock(device) is time.process_time else 'wall clock'}):")
    for name, seconds in best.items():
        print(f"  {name:38}{seconds:8.3f} s   {seconds / best[baseline]:5.2f}x {baseline}")
    return {name: (results[name], best[name]) for name in runs}


def family_forward_table(hf_forward: Callable[[], torch.Tensor], model: object, batch: object,
                         device: str, rounds: int,
                         extra: dict[str, Callable[[], object]] | None = None
                         ) -> dict[str, tuple[object, float]]:
    """The family benchmarks' table (``forward_table``): HF's sdpa forward (``hf_forward``
    returns its logits), any ``extra`` rows, mmlens's forward and ``run_with_cache`` with every
    hook; then the largest difference of the logits."""
    results = forward_table({
        "HF sdpa forward": hf_forward, **(extra or {}),
        "mmlens forward": lambda: model(batch),
        "mmlens run_with_cache (every hook)": lambda: model.run_with_cache(batch)[0],
    }, device, rounds)
    diff = results["HF sdpa forward"][0].float() - results["mmlens forward"][0].float()
    print(f"max |logits mmlens - HF|: {diff.abs().max().item():.2e}")
    return results


@torch.no_grad()
def sweep_speedup(model: object, batch: object, flows: tuple[str, ...], naive_layers: int,
                  device: str, exclude: int) -> None:
    """Print the fast sweep's and the naive sweep's time per example (the naive one run at
    ``naive_layers`` centre layers and extrapolated) and their largest difference."""
    from mmlens.experiments import default_window, parse_flows
    from mmlens.experiments.engine import clean_run, fast_knockout_probs
    from mmlens.experiments.knockouts import window_knockouts
    from mmlens.experiments.naive import naive_knockout_probs

    n_layers = model.cfg.n_layers
    window = default_window(n_layers)
    cells = window_knockouts(parse_flows(flows), batch.spans[0], window, n_layers,
                             cross_attention=bool(model.cfg.text.cross_attention_layers),
                             key_spans=batch.key_spans)
    step = max(1, n_layers // naive_layers)
    centres = list(range(0, n_layers, step))[:naive_layers]
    chosen = [i for i, cell in enumerate(cells) if cell.layer in centres]
    token = clean_run(model, batch).prediction(exclude=exclude)
    knockouts = [cell.knockout for cell in cells]
    fast, fast_s = timed(lambda: fast_knockout_probs(
        model, clean_run(model, batch), knockouts, token), device)
    naive, naive_s = timed(lambda: naive_knockout_probs(
        model, batch, [knockouts[i] for i in chosen], token), device)
    naive_s *= len(cells) / len(chosen)
    gap = (fast[chosen] - naive).abs().max().item()
    print(f"sweep: {len(cells)} knockouts ({len(flows)} flows x {n_layers} layers, "
          f"window {window}); naive ran {len(chosen)}, time extrapolated")
    print(f"  fast {fast_s:.2f} s/example, naive {naive_s:.2f} s/example, speed-up "
          f"{naive_s / fast_s:.1f}x, max |p_block fast - naive| {gap:.1e}")


def family_bench_args(doc: str | None, text_layers: bool = False
                      ) -> tuple[argparse.Namespace, torch.dtype]:
    """The options every family benchmark takes (device, dtype, real shapes, the naive path's
    layers, threads, timing rounds; ``--text-layers`` where ``text_layers``), parsed, with the
    thread count applied and the dtype resolved."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--real-shapes", action="store_true")
    parser.add_argument("--naive-layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3, help="alternated timing rounds")
    if text_layers:
        parser.add_argument("--text-layers", type=int, default=None,
                            help="the decoder's depth (default: the layout's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args, getattr(torch, args.dtype)

