"""Qwen2.5-VL with random weights: forward and run_with_cache against HF, and the
information-flow sweep (fast engine vs one full forward per knockout).

Qwen2.5-VL-7B's layout at scaled-down widths by default (window attention with full layers,
gated vision MLPs, M-RoPE), one 336x336 image (24x24 patches -> 144 image tokens) between a
system prompt and a 12-token question. ``--real-shapes`` uses Qwen2.5-VL-7B's widths (a GPU).

    python benchmarks/bench_qwen.py --threads 1 --naive-layers 2
    python benchmarks/bench_qwen.py --device cuda --dtype bfloat16 --real-shapes --naive-layers 4
"""

from __future__ import annotations

import torch
from _common import family_bench_args, family_forward_table, sweep_speedup
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from mmlens import HookedMultimodalTransformer
from mmlens.experiments import DEFAULT_FLOWS
from mmlens.inputs.batch import MultimodalBatch

IMAGE_TOKEN, GRID, BEFORE, QUESTION, AFTER = 151655, 24, 20, 12, 15


def config(real_shapes: bool) -> Qwen2_5_VLConfig:
    scale = 1 if real_shapes else 4
    vision = dict(depth=32 if real_shapes else 8, hidden_size=1280 // scale,
                  intermediate_size=3420 // scale, num_heads=16 // scale,
                  out_hidden_size=3584 // scale if real_shapes else 512,
                  fullatt_block_indexes=[7, 15, 23, 31] if real_shapes else [3, 7])
    text = dict(hidden_size=3584 if real_shapes else 512,
                intermediate_size=18944 if real_shapes else 1376,
                num_hidden_layers=28 if real_shapes else 8,
                num_attention_heads=28 if real_shapes else 8,
                num_key_value_heads=4 if real_shapes else 2, vocab_size=152064,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [16, 24, 24] if real_shapes else [8, 12, 12]})
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)


def layout(device: str, dtype: torch.dtype, *, patch: int = 14, before: int = BEFORE,
           after: int = AFTER) -> MultimodalBatch:
    """One GRID x GRID-patch image after ``before`` tokens, a question and ``after`` tokens."""
    gen = torch.Generator().manual_seed(0)
    n_image = GRID * GRID // 4
    ids = torch.cat([torch.randint(0, 150000, (before,), generator=gen),
                     torch.full((n_image,), IMAGE_TOKEN),
                     torch.randint(0, 150000, (QUESTION + after,), generator=gen)])[None]
    image = torch.arange(before, before + n_image)
    related = image.reshape(GRID // 2, GRID // 2)[3:7, 4:8].flatten()
    spans = {"image": image, "question": torch.arange(image[-1] + 1, image[-1] + 1 + QUESTION),
             "last": torch.tensor([ids.shape[1] - 1]), "related": related,
             "other": image[~torch.isin(image, related)]}
    pixels = torch.randn(1, GRID * GRID, 3 * 2 * patch * patch, generator=gen)
    return MultimodalBatch(ids.to(device), torch.ones_like(ids).to(device),
                           pixels.to(device, dtype), [spans],
                           image_sizes=torch.tensor([[1, GRID, GRID]], device=device))


@torch.no_grad()
def main() -> None:
    args, dtype = family_bench_args(__doc__)
    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(config(args.real_shapes)).to(args.device, dtype)
    hf.eval()
    model = HookedMultimodalTransformer.from_hf_model(hf).eval()
    batch = layout(args.device, dtype)
    grid = batch.image_sizes
    hf_inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     pixel_values=batch.pixel_values[0], image_grid_thw=grid,
                     mm_token_type_ids=(batch.input_ids == IMAGE_TOKEN).int())
    print(f"Qwen2.5-VL, {model.cfg.n_layers} layers x d_model {model.cfg.d_model}, vision "
          f"{model.cfg.vision.n_layers} x {model.cfg.vision.d_model}, {batch.input_ids.shape[1]} "
          f"positions ({GRID * GRID // 4} image tokens), {args.dtype} on {args.device}")
    family_forward_table(lambda: hf(**hf_inputs).logits, model, batch, args.device,
                         args.rounds)

    sweep_speedup(model, batch, DEFAULT_FLOWS, args.naive_layers, args.device, IMAGE_TOKEN)


if __name__ == "__main__":
    main()
