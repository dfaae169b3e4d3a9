"""SmolVLM / Idefics3 with random weights: forward and run_with_cache against HF, and the
information-flow sweep (fast engine vs one full forward per knockout), as ratios measured in
one run.

SmolVLM-256M's layout at scaled-down depths by default: 512 px tiles of 16 px patches (a 32x32
grid), pixel-shuffled 4x4 into 64 tokens a tile; one image as 2x2 tiles plus the global view
(320 image tokens, each tile after its ``<fake_token_around_image><row_r_col_c>`` markers)
between a prompt and a 12-token question; a Llama decoder with grouped-query attention.
``--real-shapes`` uses SmolVLM-256M's depths (12 vision, 30 decoder blocks).

    python benchmarks/bench_idefics3.py --threads 1 --naive-layers 2
    python benchmarks/bench_idefics3.py --device cuda --dtype bfloat16 --real-shapes
"""

from __future__ import annotations

import torch
from _common import family_bench_args, family_forward_table, sweep_speedup
from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

from mmlens import HookedMultimodalTransformer
from mmlens.experiments import DEFAULT_FLOWS
from mmlens.inputs.batch import MultimodalBatch

IMAGE_TOKEN, FAKE, GLOBAL = 49190, 49189, 49152
ROWS = COLS = 2
TILE, PATCH, SCALE = 512, 16, 4
PER_TILE = (TILE // PATCH // SCALE) ** 2
QUESTION, BEFORE, AFTER = 12, 8, 6


def config(real_shapes: bool) -> SmolVLMConfig:
    vision = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                  num_hidden_layers=12 if real_shapes else 4, image_size=TILE,
                  patch_size=PATCH)
    text = dict(model_type="llama", hidden_size=576, intermediate_size=1536,
                num_hidden_layers=30 if real_shapes else 8, num_attention_heads=9,
                num_key_value_heads=3, vocab_size=49280, rms_norm_eps=1e-5,
                max_position_embeddings=8192, rope_parameters={"rope_type": "default",
                                                               "rope_theta": 1e5})
    return SmolVLMConfig(vision_config=vision, text_config=text, scale_factor=SCALE,
                         image_token_id=IMAGE_TOKEN, tie_word_embeddings=True)


def layout(device: str, dtype: torch.dtype) -> MultimodalBatch:
    """The processor's token layout for one image of ``ROWS x COLS`` tiles; ``related`` is a
    box over the centre of the image: a 2x2 corner of each tile's tokens and of the global
    view's."""
    gen = torch.Generator().manual_seed(0)
    pieces, image, related = [torch.randint(0, 49000, (BEFORE,), generator=gen)], [], []
    position = BEFORE
    side = TILE // PATCH // SCALE
    corners = {(0, 0): (side - 2, side - 2), (0, 1): (side - 2, 0), (1, 0): (0, side - 2),
               (1, 1): (0, 0), "global": (side // 2 - 1, side // 2 - 1)}
    for tile in [(r, c) for r in range(ROWS) for c in range(COLS)] + ["global"]:
        marker = GLOBAL if tile == "global" else 49153 + 6 * tile[0] + tile[1]
        pieces += [torch.tensor([FAKE, marker]), torch.full((PER_TILE,), IMAGE_TOKEN)]
        tokens = torch.arange(position + 2, position + 2 + PER_TILE)
        image.append(tokens)
        top, left = corners[tile]
        related.append(tokens.reshape(side, side)[top:top + 2, left:left + 2].flatten())
        position += 2 + PER_TILE
    pieces += [torch.tensor([FAKE]), torch.randint(0, 49000, (QUESTION + AFTER,), generator=gen)]
    ids = torch.cat(pieces)[None]
    image, related = torch.cat(image), torch.cat(related)
    question = torch.arange(position + 1, position + 1 + QUESTION)
    spans = {"image": image, "question": question, "last": torch.tensor([ids.shape[1] - 1]),
             "related": related, "other": image[~torch.isin(image, related)]}
    pixels = torch.randn(1, ROWS * COLS + 1, 3, TILE, TILE, generator=gen)
    return MultimodalBatch(ids.to(device), torch.ones_like(ids).to(device),
                           pixels.to(device, dtype), [spans])


@torch.no_grad()
def main() -> None:
    args, dtype = family_bench_args(__doc__)
    torch.manual_seed(0)
    hf = SmolVLMForConditionalGeneration(config(args.real_shapes)).to(args.device, dtype).eval()
    model = HookedMultimodalTransformer.from_hf_model(hf).eval()
    batch = layout(args.device, dtype)
    hf_inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     pixel_values=batch.pixel_values)
    cfg = model.cfg
    print(f"SmolVLM, {cfg.n_layers} layers x d_model {cfg.d_model}, vision "
          f"{cfg.vision.n_layers} x {cfg.vision.d_model} on {ROWS}x{COLS} tiles + global "
          f"({TILE} px, {PER_TILE} tokens each), {batch.input_ids.shape[1]} positions, "
          f"{args.dtype} on {args.device}")
    family_forward_table(lambda: hf(**hf_inputs).logits, model, batch, args.device,
                         args.rounds)

    sweep_speedup(model, batch, DEFAULT_FLOWS, args.naive_layers, args.device, IMAGE_TOKEN)


if __name__ == "__main__":
    main()
