"""Llama-3.2-Vision with random weights: forward against HF (sdpa and eager), and the
information-flow sweep (fast engine vs one full forward per knockout), as ratios measured in one
run.

Llama-3.2-11B-Vision's layout at scaled-down widths by default: a tiled vision encoder (224 px
tiles of 14 px patches, 257 tokens a tile padded to 264, up to 4 tiles; 6 local layers, 3 of
them concatenated to the output, 2 gated global layers), a 10-layer decoder of width 512 with
grouped-query attention whose layers 3 and 8 are gated cross-attention layers (every 5th from
the 4th, as in the real one); one image of ``--tiles`` tiles (1-4) after a short prompt and
before a 12-token question. ``--real-shapes`` uses the 11B model's widths and depths (a GPU).

    python benchmarks/bench_mllama.py --threads 1 --naive-layers 2
    python benchmarks/bench_mllama.py --device cuda --dtype bfloat16 --real-shapes
"""

from __future__ import annotations

import statistics
import sys

import torch
from _common import family_bench_args, measure, sweep_speedup, timed
from transformers import MllamaConfig, MllamaForConditionalGeneration

from mmlens import HookedMultimodalTransformer
from mmlens.experiments import DEFAULT_FLOWS
from mmlens.inputs.batch import MultimodalBatch
from mmlens.methods import block_attention

IMAGE_TOKEN, BEFORE, QUESTION, AFTER = 128256, 6, 12, 6
RATIOS = [[a, b] for a in range(1, 5) for b in range(1, 5) if a * b <= 4]  # HF's order


def config(real_shapes: bool) -> MllamaConfig:
    if real_shapes:
        vision = dict(hidden_size=1280, attention_heads=16, intermediate_size=5120,
                      num_hidden_layers=32, num_global_layers=8, image_size=560,
                      intermediate_layers_indices=[3, 7, 15, 23, 30], vision_output_dim=7680)
        text = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=40,
                    num_attention_heads=32, num_key_value_heads=8,
                    cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38])
    else:
        vision = dict(hidden_size=256, attention_heads=4, intermediate_size=1024,
                      num_hidden_layers=6, num_global_layers=2, image_size=224,
                      intermediate_layers_indices=[1, 3, 5], vision_output_dim=1024)
        text = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=10,
                    num_attention_heads=8, num_key_value_heads=2, cross_attention_layers=[3, 8])
    return MllamaConfig(
        vision_config=dict(patch_size=14, max_num_tiles=4, supported_aspect_ratios=RATIOS,
                           **vision),
        text_config=dict(vocab_size=IMAGE_TOKEN, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                         **text),
        image_token_index=IMAGE_TOKEN)


def layout(cfg: MllamaConfig, tiles: int, device: str,
           dtype: torch.dtype) -> tuple[MultimodalBatch, dict[str, torch.Tensor]]:
    """``BEFORE`` tokens, ``<|image|>``, a question, ``AFTER``; an image of ``tiles`` tiles laid
    side by side; ``related``: keys of a 6x6-patch object in the first tile."""
    gen = torch.Generator().manual_seed(0)
    vc = cfg.vision_config
    ids = torch.cat([torch.randint(0, IMAGE_TOKEN, (BEFORE,), generator=gen),
                     torch.tensor([IMAGE_TOKEN]),
                     torch.randint(0, IMAGE_TOKEN, (QUESTION + AFTER,), generator=gen)])[None]
    ratio = RATIOS.index([1, tiles]) + 1  # (rows, cols), as HF's processor looks them up
    grid = vc.image_size // vc.patch_size
    n_tokens = grid**2 + 1
    keys = torch.arange(vc.max_num_tiles * n_tokens)
    patches = 1 + torch.arange(grid**2).reshape(grid, grid)[4:10, 5:11].flatten()
    real = keys[:tiles * n_tokens]
    spans = {"image": torch.tensor([BEFORE]), "last": torch.tensor([ids.shape[1] - 1]),
             "question": torch.arange(BEFORE + 1, BEFORE + 1 + QUESTION), "related": patches,
             "other": real[(real % n_tokens != 0) & ~torch.isin(real, patches)]}
    pixels = torch.zeros(1, 1, vc.max_num_tiles, 3, vc.image_size, vc.image_size)
    pixels[:, :, :tiles] = torch.randn(1, 1, tiles, 3, vc.image_size, vc.image_size,
                                       generator=gen)
    batch = MultimodalBatch(ids.to(device), torch.ones_like(ids).to(device),
                            pixels.to(device, dtype), [spans],
                            image_sizes=torch.tensor([[ratio]], device=device),
                            key_spans=frozenset({"related", "other"}))
    hf_inputs = dict(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask,
        pixel_values=batch.pixel_values, aspect_ratio_ids=batch.image_sizes,
        aspect_ratio_mask=(torch.arange(vc.max_num_tiles) < tiles).long()[None, None].to(device),
        cross_attention_mask=torch.zeros(1, ids.shape[1], 1, vc.max_num_tiles, dtype=torch.long,
                                         device=device))
    hf_inputs["cross_attention_mask"][:, BEFORE:, :, :tiles] = 1
    return batch, hf_inputs


@torch.no_grad()
def main() -> None:
    tiles = 4
    if "--tiles" in sys.argv:  # the shared parser's options plus this one
        at = sys.argv.index("--tiles")
        tiles = int(sys.argv[at + 1])
        del sys.argv[at:at + 2]
    args, dtype = family_bench_args(__doc__)
    torch.manual_seed(0)
    cfg = config(args.real_shapes)
    hf = MllamaForConditionalGeneration(cfg)
    with torch.no_grad():  # HF starts every gate at 0, which would keep the image out
        for name, param in hf.named_parameters():
            if "gate" in name.rsplit(".", 1)[-1]:
                param.uniform_(0.5, 1.0)
    hf = hf.to(args.device, dtype).eval()
    model = HookedMultimodalTransformer.from_hf_model(hf).eval()
    batch, hf_inputs = layout(cfg, tiles, args.device, dtype)
    n_keys = cfg.vision_config.max_num_tiles * ((cfg.vision_config.image_size // 14) ** 2 + 1)
    print(f"Llama-3.2-Vision, {model.cfg.n_layers} layers (cross-attention "
          f"{list(model.cfg.text.cross_attention_layers)}) x d_model {model.cfg.d_model}, vision "
          f"{model.cfg.vision.n_layers}+{model.cfg.vision.n_global_layers} x "
          f"{model.cfg.vision.d_model}, {tiles} of {cfg.vision_config.max_num_tiles} tiles "
          f"({n_keys} image keys), {batch.input_ids.shape[1]} positions, {args.dtype} on "
          f"{args.device}, {torch.get_num_threads()} threads")
    diff = hf(**hf_inputs).logits.float() - model(batch).float()
    print(f"max |logits mmlens - HF|: {diff.abs().max().item():.2e}")
    rows = {}
    for attn in ("sdpa", "eager"):
        hf.set_attn_implementation(attn)
        rows[attn] = measure(lambda: hf(**hf_inputs).logits, args.device, repeats=3)[0]
    hf.set_attn_implementation("sdpa")
    ours_s, _ = measure(lambda: model(batch), args.device, repeats=3)
    print(f"  HF sdpa forward                       {rows['sdpa']:8.3f} s")
    print(f"  HF eager forward                      {rows['eager']:8.3f} s")
    print(f"  mmlens forward                        {ours_s:8.3f} s   "
          f"{ours_s / rows['sdpa']:.2f}x HF sdpa, {ours_s / rows['eager']:.2f}x HF eager")
    # on a shared machine the load drifts between the blocks above: alternate the forwards
    ratios = [timed(lambda: model(batch), args.device)[1]
              / timed(lambda: hf(**hf_inputs).logits, args.device)[1] for _ in range(4)]
    print(f"  mmlens forward / HF sdpa, alternated 4 rounds: median "
          f"{statistics.median(ratios):.2f}x (rounds {', '.join(f'{r:.2f}' for r in ratios)})")

    flows = (*DEFAULT_FLOWS, "related->last", "other->last")
    sweep_speedup(model, batch, flows, args.naive_layers, args.device, IMAGE_TOKEN)
    blocked = model.run_with_hooks(batch, fwd_hooks=block_attention(
        "image", "last", list(model.cfg.text.cross_attention_layers), batch=batch, model=model))
    print(f"  the image matters: blocking it from the last position changes its logits by "
          f"{(blocked[0, -1] - model(batch)[0, -1]).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
