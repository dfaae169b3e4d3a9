"""LLaVA-OneVision: forward and run_with_cache vs Hugging Face, and the sweep fast vs naive.

Random weights at LLaVA-OneVision's token layout: SigLIP 384/14 tiles (729 features each), a
384 x 768 image (base tile + 2 tiles, 27 x 54 kept features, a newline per row: 2214 image
tokens), a Qwen2 decoder. Widths are scaled down unless ``--real-shapes`` (OneVision-7B:
SigLIP-so400m 26 blocks x 1152, Qwen2-7B 28 layers x 3584, 28 heads, 4 key/value heads).

    python benchmarks/bench_onevision.py --threads 1 --naive-layers 2     # CPU, scaled down
    python benchmarks/bench_onevision.py --device cuda --dtype bfloat16 --real-shapes
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import measure, sync
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

from mmlens import HookedMultimodalTransformer
from mmlens.core.sizes import ImageSize
from mmlens.experiments import DEFAULT_FLOWS, default_window, parse_flows
from mmlens.experiments.engine import clean_run, fast_knockout_probs
from mmlens.experiments.knockouts import window_knockouts
from mmlens.experiments.naive import naive_knockout_probs
from mmlens.inputs.anyres_spans import anyres_related_positions
from mmlens.inputs.batch import MultimodalBatch
from mmlens.inputs.tiling import image_sizes_tensor

IMAGE_TOKEN, BEFORE, QUESTION, AFTER = 151646, 14, 12, 20
IMAGE_SIZE = ImageSize(width=768, height=384)
PINPOINTS = [[384 * r, 384 * c] for r in range(1, 7) for c in range(1, 7)]


def onevision_config(real_shapes: bool) -> LlavaOnevisionConfig:
    if real_shapes:
        vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                      num_attention_heads=16)
        text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, vocab_size=152128)
    else:
        vision = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=4)
        text = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=2, vocab_size=152128)
    return LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(image_size=384, patch_size=14, vision_use_head=False,
                                         **vision),
        text_config=Qwen2Config(max_position_embeddings=32768, **text),
        image_token_index=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS,
        vision_aspect_ratio="anyres_max_9", vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )


def layout_batch(model, device: str, dtype: torch.dtype) -> MultimodalBatch:
    """``[system, image tokens, question, instruction + last]`` with every span; ``related``
    is a 150 x 100 px box mapped through the tiling."""
    geometry = model.anyres.geometry
    n_image = geometry.n_image_tokens(IMAGE_SIZE)
    gen = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(10, 150000, (BEFORE,), generator=gen),
                     torch.full((n_image,), IMAGE_TOKEN),
                     torch.randint(10, 150000, (QUESTION + AFTER,), generator=gen)])[None]
    image = torch.arange(BEFORE, BEFORE + n_image)
    related, other = anyres_related_positions([(300, 100, 150, 100)], IMAGE_SIZE, model.cfg)
    spans = {"image": image, "question": torch.arange(image[-1] + 1, image[-1] + 1 + QUESTION),
             "last": torch.tensor([ids.shape[1] - 1]), "related": BEFORE + related,
             "other": BEFORE + other}
    pixels = torch.randn(1, geometry.n_tiles(IMAGE_SIZE), 3, 384, 384, generator=gen)
    return MultimodalBatch(ids.to(device), torch.ones_like(ids).to(device),
                           pixels.to(device, dtype), [spans],
                           image_sizes=image_sizes_tensor([IMAGE_SIZE]).to(device))


def bench_model(hf, model, batch, device: str, repeats: int) -> None:
    inputs = dict(input_ids=batch.input_ids, pixel_values=batch.pixel_values,
                  image_sizes=batch.image_sizes)
    rows = {
        "mmlens forward": measure(lambda: model(batch), device, repeats),
        "HF sdpa forward": measure(lambda: hf(**inputs), device, repeats),
        "mmlens run_with_cache (all hooks)": measure(lambda: model.run_with_cache(batch),
                                                     device, repeats),
    }
    hf.set_attn_implementation("eager")
    rows["HF eager + hidden states + attentions"] = measure(
        lambda: hf(**inputs, output_hidden_states=True, output_attentions=True), device, repeats)
    hf.set_attn_implementation("sdpa")
    print(f"{'':40s} {'seconds':>9s} {'peak MiB':>9s}")
    for name, (seconds, mib) in rows.items():
        print(f"{name:40s} {seconds:9.4f} {mib:9.0f}")
    ratio = rows["mmlens forward"][0] / rows["HF sdpa forward"][0]
    print(f"mmlens forward / HF sdpa forward: {ratio:.2f}x")


def bench_flow(model, batch, device: str, naive_layers: int | None, batch_size: int) -> None:
    n_layers = model.cfg.n_layers
    cells = window_knockouts(parse_flows(DEFAULT_FLOWS), batch.spans[0],
                             default_window(n_layers), n_layers)
    centres = list(range(n_layers))
    if naive_layers:
        centres = list(range(0, n_layers, max(1, n_layers // naive_layers)))[:naive_layers]
    chosen = [i for i, cell in enumerate(cells) if cell.layer in centres]
    knockouts = [cell.knockout for cell in cells]
    with torch.no_grad():
        sync(device)
        start = time.perf_counter()
        clean = clean_run(model, batch)
        token = clean.prediction(exclude=IMAGE_TOKEN)
        fast = fast_knockout_probs(model, clean, knockouts, token, batch_size=batch_size)
        sync(device)
        fast_seconds = time.perf_counter() - start
        start = time.perf_counter()
        naive = naive_knockout_probs(model, batch, [knockouts[i] for i in chosen], token)
        sync(device)
        naive_seconds = (time.perf_counter() - start) * len(cells) / len(chosen)
    diff = (fast[chosen] - naive).abs().max().item()
    print(f"sweep: {len(cells)} knockouts ({len(DEFAULT_FLOWS)} flows x {n_layers} layers, "
          f"window {default_window(n_layers)}); naive ran {len(chosen)}, time extrapolated")
    print(f"fast {fast_seconds:.2f} s/example, naive {naive_seconds:.2f} s/example, speed-up "
          f"{naive_seconds / fast_seconds:.1f}x, max |p_block fast - naive| {diff:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--real-shapes", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-layers", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--part", choices=["model", "flow", "both"], default="both")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    with torch.device(args.device):
        hf = LlavaOnevisionForConditionalGeneration._from_config(
            onevision_config(args.real_shapes), attn_implementation="sdpa", dtype=dtype).eval()
    model = HookedMultimodalTransformer.from_hf_model(hf)  # shares hf's weights
    batch = layout_batch(model, args.device, dtype)
    print(f"{'OneVision-7B shapes' if args.real_shapes else 'scaled-down widths'}, "
          f"{args.device}, {args.dtype}: {batch.input_ids.shape[1]} positions "
          f"({len(batch.positions('image', 0))} image), d_model {model.cfg.d_model}, "
          f"{model.cfg.n_layers} layers, SigLIP {model.cfg.vision.n_layers} x "
          f"{model.cfg.vision.d_model} on {batch.pixel_values.shape[1]} tiles")
    if args.part in ("model", "both"):
        bench_model(hf, model, batch, args.device, args.repeats)
    if args.part in ("flow", "both"):
        bench_flow(model, batch, args.device, args.naive_layers, args.batch_size)


if __name__ == "__main__":
    main()
