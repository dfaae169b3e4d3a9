"""Qwen3-VL with random weights: forward and run_with_cache against HF, and the
information-flow sweep with the DeepStack removal flow (fast engine vs one full forward per
knockout), as ratios measured in one run.

Qwen3-VL-2B's layout at scaled-down widths by default (learned vision positions from a 48x48
table, DeepStack from three vision blocks into the first three decoder blocks, Qwen3 decoder
with q/k norm and interleaved M-RoPE), one 384x384 image (24x24 patches of 16 px -> 144 image
tokens) between a prompt and a 12-token question. ``--real-shapes`` uses Qwen3-VL-2B's widths;
``--text-layers 28`` its depth at the scaled-down widths.

    python benchmarks/bench_qwen3_vl.py --threads 1 --naive-layers 2
    python benchmarks/bench_qwen3_vl.py --threads 1 --naive-layers 2 --text-layers 28
    python benchmarks/bench_qwen3_vl.py --device cuda --dtype bfloat16 --real-shapes
"""

from __future__ import annotations

import torch
from _common import family_bench_args, family_forward_table, sweep_speedup
from bench_qwen import GRID, IMAGE_TOKEN, layout
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from mmlens import HookedMultimodalTransformer
from mmlens.experiments import DEFAULT_FLOWS

PATCH = 16
FLOWS = (*DEFAULT_FLOWS, "deepstack->image")


def config(real_shapes: bool, text_layers: int | None = None) -> Qwen3VLConfig:
    scale = 1 if real_shapes else 4
    n_layers = text_layers or (28 if real_shapes else 8)
    vision = dict(depth=24 if real_shapes else 8, hidden_size=1024 // scale,
                  intermediate_size=4096 // scale, num_heads=16 // scale, patch_size=PATCH,
                  out_hidden_size=2048 // scale, num_position_embeddings=2304,
                  deepstack_visual_indexes=[5, 11, 17] if real_shapes else [1, 3, 5])
    text = dict(hidden_size=2048 // scale, intermediate_size=6144 // scale,
                num_hidden_layers=n_layers,
                num_attention_heads=16 if real_shapes else 8,
                num_key_value_heads=8 if real_shapes else 4,
                head_dim=128 if real_shapes else 64,
                vocab_size=151936, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                 "mrope_section": [24, 20, 20] if real_shapes else [12, 10, 10],
                                 "mrope_interleaved": True})
    return Qwen3VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)


@torch.no_grad()
def main() -> None:
    args, dtype = family_bench_args(__doc__, text_layers=True)
    torch.manual_seed(0)
    hf = Qwen3VLForConditionalGeneration(config(args.real_shapes, args.text_layers))
    hf = hf.to(args.device, dtype).eval()
    model = HookedMultimodalTransformer.from_hf_model(hf).eval()
    batch = layout(args.device, dtype, patch=PATCH, before=12, after=6)
    batch.spans[0]["deepstack"] = batch.spans[0]["image"]  # where DeepStack adds its features
    hf_inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     pixel_values=batch.pixel_values[0], image_grid_thw=batch.image_sizes,
                     mm_token_type_ids=(batch.input_ids == IMAGE_TOKEN).int())
    cfg = model.cfg
    print(f"Qwen3-VL, {cfg.n_layers} layers x d_model {cfg.d_model}, vision "
          f"{cfg.vision.n_layers} x {cfg.vision.d_model}, DeepStack into blocks "
          f"0-{cfg.text.deepstack_layers - 1}, {batch.input_ids.shape[1]} positions "
          f"({GRID * GRID // 4} image tokens), {args.dtype} on {args.device}")
    family_forward_table(lambda: hf(**hf_inputs).logits, model, batch, args.device,
                         args.rounds)

    sweep_speedup(model, batch, FLOWS, args.naive_layers, args.device, IMAGE_TOKEN)


if __name__ == "__main__":
    main()
