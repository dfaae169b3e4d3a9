"""Gemma 3 with random weights: forward and run_with_cache against HF (sdpa and eager), and
the information-flow sweep (fast engine vs one full forward per knockout), as ratios measured
in one run.

Gemma-3-4B's layout at scaled-down widths by default: SigLIP 448/14 (32x32 patches) pooled
4x4 to 64 image tokens, a decoder of 12 layers with a global layer every sixth and a 32-token
sliding window (so the window cuts the prompt), grouped-query attention, q/k norms.
``--real-shapes`` uses Gemma-3-4B's widths (896/14 -> 256 tokens, 34 layers; a GPU).

    python benchmarks/bench_gemma3.py --threads 1 --naive-layers 2
    python benchmarks/bench_gemma3.py --device cuda --dtype bfloat16 --real-shapes
"""

from __future__ import annotations

import torch
from _common import family_bench_args, family_forward_table, sweep_speedup
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

from mmlens import HookedMultimodalTransformer
from mmlens.experiments import DEFAULT_FLOWS
from mmlens.inputs.batch import MultimodalBatch

IMAGE_TOKEN, BEFORE, QUESTION, AFTER = 6, 8, 12, 6


def config(real_shapes: bool) -> Gemma3Config:
    if real_shapes:
        vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                      num_attention_heads=16, image_size=896, patch_size=14)
        text = dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                    query_pre_attn_scalar=256, sliding_window=1024, vocab_size=262208)
        tokens = 256
    else:
        vision = dict(hidden_size=288, intermediate_size=1152, num_hidden_layers=6,
                      num_attention_heads=4, image_size=448, patch_size=14)
        text = dict(hidden_size=640, intermediate_size=2560, num_hidden_layers=12,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                    query_pre_attn_scalar=64, sliding_window=32, vocab_size=32768)
        tokens = 64
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}
    return Gemma3Config(vision_config=dict(vision_use_head=False, **vision),
                        text_config=dict(rope_parameters=rope, **text),
                        mm_tokens_per_image=tokens, image_token_index=IMAGE_TOKEN,
                        boi_token_index=4, eoi_token_index=5)


def layout(cfg: Gemma3Config, device: str, dtype: torch.dtype) -> MultimodalBatch:
    gen = torch.Generator().manual_seed(0)
    n_image, side = cfg.mm_tokens_per_image, int(cfg.mm_tokens_per_image**0.5)
    vocab = cfg.text_config.vocab_size
    ids = torch.cat([torch.tensor([2]), torch.randint(10, vocab, (BEFORE - 2,), generator=gen),
                     torch.tensor([4]), torch.full((n_image,), IMAGE_TOKEN), torch.tensor([5]),
                     torch.randint(10, vocab, (QUESTION + AFTER,), generator=gen)])[None]
    image = torch.arange(BEFORE, BEFORE + n_image)
    related = image.reshape(side, side)[1:side // 2, 2:side // 2 + 1].flatten()
    spans = {"image": image, "question": torch.arange(image[-1] + 2, image[-1] + 2 + QUESTION),
             "last": torch.tensor([ids.shape[1] - 1]), "related": related,
             "other": image[~torch.isin(image, related)]}
    size = cfg.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=gen)
    return MultimodalBatch(ids.to(device), torch.ones_like(ids).to(device),
                           pixels.to(device, dtype), [spans])


@torch.no_grad()
def main() -> None:
    args, dtype = family_bench_args(__doc__)
    torch.manual_seed(0)
    cfg = config(args.real_shapes)
    hf = Gemma3ForConditionalGeneration(cfg).to(args.device, dtype).eval()
    with torch.no_grad():  # the projector and norms start at zero: make them matter
        for param in hf.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    model = HookedMultimodalTransformer.from_hf_model(hf).eval()
    batch = layout(cfg, args.device, dtype)
    hf_inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     pixel_values=batch.pixel_values,
                     token_type_ids=(batch.input_ids == IMAGE_TOKEN).long())
    print(f"Gemma 3, {model.cfg.n_layers} layers x d_model {model.cfg.d_model}, vision "
          f"{model.cfg.vision.n_layers} x {model.cfg.vision.d_model}, "
          f"{batch.input_ids.shape[1]} positions ({cfg.mm_tokens_per_image} image tokens), "
          f"window {cfg.text_config.sliding_window}, {args.dtype} on {args.device}")

    def hf_forward(attn: str):
        def run():
            hf.set_attn_implementation(attn)
            return hf(**hf_inputs).logits
        return run

    family_forward_table(hf_forward("sdpa"), model, batch, args.device, args.rounds,
                         extra={"HF eager forward": hf_forward("eager")})
    hf.set_attn_implementation("sdpa")

    sweep_speedup(model, batch, DEFAULT_FLOWS, args.naive_layers, args.device, IMAGE_TOKEN)

if __name__ == "__main__":
    main()
