"""InternVL 3 with random weights: forward and run_with_cache against HF, and the
information-flow sweep (fast engine vs one full forward per knockout), as ratios measured in one
run.

InternVL3-1B's layout at scaled-down widths by default (InternViT on 448 px tiles of 14 px
patches, a class token, layer scale; 2x2 pixel shuffle -> 256 image tokens a tile; LayerNorm +
MLP projector; a Qwen2 decoder with grouped-query attention), one wide image cut into 2x1 tiles
plus its thumbnail (768 image tokens between ``<img>`` and ``</img>``) after a prompt and before
a 12-token question. ``--real-shapes`` uses InternVL3-1B's widths and depths.

    python benchmarks/bench_internvl.py --threads 1 --naive-layers 2
    python benchmarks/bench_internvl.py --device cuda --dtype bfloat16 --real-shapes
"""

from __future__ import annotations

import torch
from _common import family_bench_args, family_forward_table, sweep_speedup
from transformers import InternVLConfig, InternVLForConditionalGeneration

from mmlens import HookedMultimodalTransformer
from mmlens.experiments import DEFAULT_FLOWS
from mmlens.inputs.batch import MultimodalBatch

IMAGE_TOKEN, START, END = 151667, 151665, 151666
TILE, PATCH, TILES, BEFORE, QUESTION, AFTER = 448, 14, 3, 12, 12, 6
PER_TILE = (TILE // PATCH // 2) ** 2


def config(real_shapes: bool) -> InternVLConfig:
    scale = 1 if real_shapes else 4
    vision = dict(hidden_size=1024 // scale, intermediate_size=4096 // scale,
                  num_hidden_layers=24 if real_shapes else 6, num_attention_heads=16 // scale,
                  image_size=TILE, patch_size=PATCH, attention_bias=True)
    text = dict(model_type="qwen2", hidden_size=896 if real_shapes else 448,
                intermediate_size=4864 if real_shapes else 1216,
                num_hidden_layers=24 if real_shapes else 8,
                num_attention_heads=14 if real_shapes else 7, num_key_value_heads=2 if
                real_shapes else 1, vocab_size=151674, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                          image_seq_length=PER_TILE)


def layout(device: str, dtype: torch.dtype) -> MultimodalBatch:
    """``BEFORE`` tokens, ``<img>``, 3 tiles' image tokens, ``</img>``, a question, ``AFTER``."""
    gen = torch.Generator().manual_seed(0)
    n_image = TILES * PER_TILE
    ids = torch.cat([torch.randint(0, 150000, (BEFORE,), generator=gen), torch.tensor([START]),
                     torch.full((n_image,), IMAGE_TOKEN), torch.tensor([END]),
                     torch.randint(0, 150000, (QUESTION + AFTER,), generator=gen)])[None]
    image = torch.arange(BEFORE + 1, BEFORE + 1 + n_image)
    side = TILE // PATCH // 2
    # an object in the first tile's centre and where the thumbnail shows it
    tiles = image.reshape(TILES, side, side)
    related = torch.cat([tiles[0, 4:12, 6:14].flatten(), tiles[2, 4:12, 3:7].flatten()])
    question = torch.arange(image[-1] + 2, image[-1] + 2 + QUESTION)
    spans = {"image": image, "question": question, "last": torch.tensor([ids.shape[1] - 1]),
             "related": related, "other": image[~torch.isin(image, related)]}
    pixels = torch.randn(1, TILES, 3, TILE, TILE, generator=gen)
    return MultimodalBatch(ids.to(device), torch.ones_like(ids).to(device),
                           pixels.to(device, dtype), [spans],
                           image_sizes=torch.tensor([[TILES]], device=device))


@torch.no_grad()
def main() -> None:
    args, dtype = family_bench_args(__doc__)
    torch.manual_seed(0)
    hf = InternVLForConditionalGeneration(config(args.real_shapes)).to(args.device, dtype).eval()
    model = HookedMultimodalTransformer.from_hf_model(hf).eval()
    batch = layout(args.device, dtype)
    hf_inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     pixel_values=batch.pixel_values[0])
    cfg = model.cfg
    print(f"InternVL 3, {cfg.n_layers} layers x d_model {cfg.d_model}, vision "
          f"{cfg.vision.n_layers} x {cfg.vision.d_model}, {TILES} tiles of {TILE} px, "
          f"{batch.input_ids.shape[1]} positions ({TILES * PER_TILE} image tokens), "
          f"{args.dtype} on {args.device}")
    family_forward_table(lambda: hf(**hf_inputs).logits, model, batch, args.device,
                         args.rounds)

    sweep_speedup(model, batch, DEFAULT_FLOWS, args.naive_layers, args.device, IMAGE_TOKEN)


if __name__ == "__main__":
    main()
