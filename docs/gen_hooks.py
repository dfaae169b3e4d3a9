"""Write docs/hooks.md: every hook point of the bundled shapes-llava model, with its shape.

    python docs/gen_hooks.py            # regenerate docs/hooks.md
    python docs/gen_hooks.py --check    # exit 1 when the committed page is out of date

Shapes come from ``model.run_with_cache`` on a real shapes question, never from a hand-kept
list. Symbolic names come from three runs: one example, the same example twice (the dims
that grow are ``batch``) and a longer question (the dims that grow are positions); the
remaining sizes are looked up among the model's config values.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

PAGE = Path(__file__).with_name("hooks.md")
MODEL = "shapes-llava"
LAYER = re.compile(r"blocks\.(\d+)\.")

DESCRIPTIONS = {
    "vision.embed.hook_patch_embed": "patch embeddings (the convolution), grid in row-major order",
    "vision.embed.hook_pos_embed": "learned position embeddings, no batch dimension",
    "vision.hook_embed": "class token + patches + positions: the tower's residual input",
    "vision.ln_pre.hook_scale": "CLIP's pre-norm divisor, one number per position",
    "vision.ln_pre.hook_normalized": "the pre-norm's output before its weight and bias",
    "projector.hook_in": "the selected CLIP features (penultimate layer, class token dropped)",
    "projector.hook_pre": "after the projector's first linear layer",
    "projector.hook_post": "after the projector's activation",
    "projector.hook_out": "image features in the language model's width, one row per image token",
    "hook_token_embed": "token embeddings before the merge (image tokens hold `<image>`'s row)",
    "hook_embed": "merged embedding: image features at image positions; the residual input",
    "ln_final.hook_scale": "final RMSNorm divisor",
    "ln_final.hook_normalized": "final RMSNorm output before its weight",
    "anyres.hook_tiles": "projected features of every tile, each image's base tile first",
    "anyres.hook_out": "packed image tokens of all images in input order (tiles unpadded, "
                       "downscaled under anyres-max, `image_newline` ending each row)",
}
BLOCK_DESCRIPTIONS = {
    "hook_resid_pre": "residual stream entering the block",
    "ln1.hook_scale": "divisor of the norm before attention, one number per position",
    "ln1.hook_normalized": "normalised attention input, before the norm's weight",
    "attn.hook_q": "queries per head",
    "attn.hook_k": "keys (grouped-query attention: one per key/value head)",
    "attn.hook_v": "values (grouped-query attention: one per key/value head)",
    "attn.hook_rot_q": "queries after the rotary embedding",
    "attn.hook_rot_k": "keys after the rotary embedding",
    "attn.hook_mask": "boolean may-attend mask (True = may attend); knockouts edit this",
    "attn.hook_attn_scores": "pre-softmax scores (explicit path: hooking it leaves sdpa)",
    "attn.hook_pattern": "attention probabilities (explicit path: hooking it leaves sdpa)",
    "attn.hook_z": "attention-weighted values per head, before the output projection",
    "hook_attn_out": "attention output added to the residual stream",
    "hook_resid_mid": "residual stream between attention and MLP",
    "ln2.hook_scale": "divisor of the norm before the MLP",
    "ln2.hook_normalized": "normalised MLP input, before the norm's weight",
    "mlp.hook_pre": "MLP pre-activation (Llama: the gate branch)",
    "mlp.hook_pre_linear": "the MLP's linear (ungated) branch",
    "mlp.hook_post": "after the activation (Llama: activation(gate) * linear branch)",
    "hook_mlp_out": "MLP output added to the residual stream",
    "hook_resid_post": "residual stream leaving the block",
}
SECTIONS = ("Vision tower", "Projector", "Language model")


@dataclass
class Row:
    """One hook name pattern (``blocks.{l}.`` for per-layer hooks) and what it looks like."""

    pattern: str
    layers: list[int] = field(default_factory=list)
    symbolic: str = ""
    concrete: str = ""


def load_model():
    from mmlens import HookedMultimodalTransformer

    return HookedMultimodalTransformer.from_pretrained(MODEL, dtype="float32").eval()


def example_inputs(model) -> tuple[str, dict[str, object]]:
    """The question shown on the page and three batches: one, wider (x2) and longer."""
    from mmlens.data.shapes import generate

    example = generate(1, seed=0)[0]
    question = example.question
    batches = {
        "one": model.prepare([example.image], [question]),
        "wider": model.prepare([example.image] * 2, [question] * 2),
        "longer": model.prepare([example.image], [f"{question} {question}"]),
    }
    return question, batches


@torch.no_grad()
def cached_shapes(model, batch) -> dict[str, tuple[int, ...]]:
    _, cache = model.run_with_cache(batch)
    return {name: tuple(tensor.shape) for name, tensor in cache.items()}


def dimension_names(model, name: str) -> dict[int, str]:
    """Config sizes a dimension of hook ``name`` may have, by value; refuses ambiguous ones."""
    cfg, vision = model.cfg, model.cfg.vision
    if name.startswith("vision."):
        named = {"d_vision": vision.d_model, "n_heads": vision.n_heads, "d_head": vision.d_head,
                 "d_mlp": vision.d_mlp, "vpos": vision.n_patches + 1, "patch": vision.n_patches}
    elif name == "projector.hook_in":
        named = {"patch": vision.n_patches, "d_vision": vision.d_model * len(cfg.feature_layers)}
    elif name.startswith("projector."):
        named = {"patch": vision.n_patches, "d_model": cfg.d_model}
    else:
        named = {"d_model": cfg.d_model, "n_heads": cfg.n_heads,
                 "n_kv_heads": cfg.n_key_value_heads, "d_head": cfg.d_head, "d_mlp": cfg.d_mlp}
    by_value: dict[int, str] = {}
    for label, value in named.items():
        if value in by_value:
            raise ValueError(f"{name}: {by_value[value]} and {label} are both {value}; the page "
                             "cannot tell them apart on this model")
        by_value[value] = label
    return by_value


def symbolic_shape(model, name: str, shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> str:
    one, wider, longer = (shapes[k][name] for k in ("one", "wider", "longer"))
    if not len(one) == len(wider) == len(longer):
        raise ValueError(f"{name} changes rank between runs: {one}, {wider}, {longer}")
    batch_label = "batch" if not name.startswith(("vision.", "projector.")) else "image"
    n_pos = sum(a != b for a, b in zip(one, longer, strict=True))
    pos_labels = iter(["pos"] if n_pos == 1 else ["q_pos", "k_pos"])
    by_value = dimension_names(model, name)
    labels = []
    for size, grown, lengthened in zip(one, wider, longer, strict=True):
        if size != grown:
            labels.append(batch_label)
        elif size != lengthened:
            labels.append(next(pos_labels))
        else:
            labels.append(by_value.get(size, str(size)))
    return "[" + ", ".join(labels) + "]"


def rows(model, shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> list[Row]:
    """One row per hook pattern, in the model's order; layers with equal shapes share a row."""
    missing = [name for name in model.hook_dict if name not in shapes["one"]]
    if missing:
        raise ValueError(f"run_with_cache did not reach {missing}: these hooks are off the "
                         "data path of a plain forward")
    by_pattern: dict[str, Row] = {}
    for name in model.hook_dict:
        match = LAYER.search(name)
        pattern = LAYER.sub("blocks.{l}.", name, count=1)
        row = by_pattern.setdefault(pattern, Row(pattern))
        symbolic = symbolic_shape(model, name, shapes)
        concrete = "[" + ", ".join(map(str, shapes["one"][name])) + "]"
        if row.concrete and (row.symbolic, row.concrete) != (symbolic, concrete):
            raise ValueError(f"{name} has shape {concrete}, other layers {row.concrete}")
        row.symbolic, row.concrete = symbolic, concrete
        if match:
            row.layers.append(int(match.group(1)))
    return list(by_pattern.values())


def section(pattern: str) -> str:
    if pattern.startswith("vision."):
        return "Vision tower"
    return "Projector" if pattern.startswith("projector.") else "Language model"


def describe(pattern: str) -> str:
    if pattern in DESCRIPTIONS:
        return DESCRIPTIONS[pattern]
    suffix = pattern.split("blocks.{l}.", 1)[-1]
    return BLOCK_DESCRIPTIONS.get(suffix, "") if "blocks.{l}." in pattern else ""


def layer_range(layers: list[int]) -> str:
    if not layers:
        return ""
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}–{layers[-1]}"
    return ", ".join(map(str, layers))


def render(model, question: str, batch, table: list[Row]) -> str:
    cfg, vision = model.cfg, model.cfg.vision
    n_pos = batch.input_ids.shape[1]
    n_image = len(batch.positions("image", 0))
    n_hooks = len(model.hook_dict)
    lines = [
        "# Hook reference",
        "",
        "<!-- Generated by docs/gen_hooks.py from model.run_with_cache; do not edit by hand. "
        "Regenerate with: python docs/gen_hooks.py -->",
        "",
        f"Every one of the {n_hooks} hook points of the bundled `{MODEL}` model, in the order "
        "the model defines them. Per-layer hooks are written `blocks.{l}.…`; the layers column "
        "gives the values of `l`. Shapes are read from `model.run_with_cache` on one example: "
        f"the question *{question}* with its image, a prompt of {n_pos} positions of which "
        f"{n_image} hold image features. A 7B LLaVA-1.5 has the same names with larger sizes "
        "(576 image positions, 32 layers, d_model 4096).",
        "",
        "Dimension names: `batch` prompts; `pos` prompt positions (`q_pos` queries, `k_pos` "
        "keys; with a key/value cache `k_pos` also counts the cached positions); `image` images; "
        f"`vpos` vision-tower positions, the class token first, then the patches "
        f"({vision.n_patches + 1} here); `patch` image patches in row-major order "
        f"({vision.grid_size}×{vision.grid_size} here); "
        f"`d_model` language width ({cfg.d_model}); `d_vision` vision width ({vision.d_model}); "
        f"`n_heads` query heads ({cfg.n_heads}); `n_kv_heads` key/value heads "
        f"({cfg.n_key_value_heads}, grouped-query attention); `d_head` ({cfg.d_head}); "
        f"`d_mlp` MLP width ({cfg.d_mlp} language, {vision.d_mlp} vision).",
        "",
        f"The vision tower has {vision.n_layers} hooked blocks: LLaVA reads the features of the "
        "penultimate CLIP layer, so the last block is never built and every vision hook lies on "
        "the data path. `hook_attn_scores` and `hook_pattern` exist on the explicit attention "
        "path: a hook there (including `run_with_cache`) switches that layer from "
        "`scaled_dot_product_attention` to the explicit computation, with the same numbers. "
        "`model.set_use_attn_result(True)` adds `blocks.{l}.attn.hook_result` (and "
        "`vision.blocks.{l}.attn.hook_result`), each head's output `[batch, pos, n_heads, "
        "d_model]`, whose sum over heads plus `b_O` is `hook_attn_out`; it is off by default "
        "(it costs `n_heads` times the attention output) and absent from this table.",
    ]
    for title in SECTIONS:
        lines += ["", f"## {title}", "",
                  "| hook | layers | shape | on the example | what it holds |",
                  "|---|---|---|---|---|"]
        lines += [f"| `{r.pattern}` | {layer_range(r.layers)} | `{r.symbolic}` | `{r.concrete}` "
                  f"| {describe(r.pattern)} |" for r in table if section(r.pattern) == title]
    return "\n".join(lines) + "\n"


def tiny_onevision():
    """A random LLaVA-OneVision with 32-px tiles of 8-px SigLIP patches, 3 vision and 2 text
    layers, and its hooked conversion."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    from mmlens import HookedMultimodalTransformer

    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=3, num_attention_heads=4,
                                         image_size=32, patch_size=8, vision_use_head=False),
        text_config=Qwen2Config(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=64),
        image_token_index=3, image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
        vision_aspect_ratio="anyres_max_2",
    )
    return HookedMultimodalTransformer.from_hf_model(
        LlavaOnevisionForConditionalGeneration(config)).eval()


@torch.no_grad()
def family_section(reference) -> list[str]:
    """The hook names of LLaVA-OneVision that differ from the bundled LLaVA-1.5's, with their
    shapes on one 64x64 image of a tiny random OneVision."""
    from mmlens.core.sizes import ImageSize
    from mmlens.inputs.tiling import image_sizes_tensor

    model = tiny_onevision()
    size = ImageSize(width=64, height=64)
    sizes = image_sizes_tensor([size])
    geometry = model.anyres.geometry
    n_image = geometry.n_image_tokens(size)
    ids = torch.tensor([[5] * 4 + [model.cfg.image_token_id] * n_image + [6] * 5])
    pixels = torch.randn(1, geometry.n_tiles(size), 3, 32, 32)
    _, cache = model.run_with_cache(ids, pixels, image_sizes=sizes)
    theirs = {LAYER.sub("blocks.{l}.", n, count=1) for n in model.hook_dict}
    ours = {LAYER.sub("blocks.{l}.", n, count=1) for n in reference.hook_dict}
    added = [n for n in model.hook_dict if n in theirs - ours]
    absent = sorted(ours - theirs)
    packed = geometry.feature_grid(size)
    kept = geometry.kept_region(size)
    lines = [
        "", "## LLaVA-OneVision", "",
        "A OneVision model (`llava_onevision`: SigLIP tower, the same projector, Qwen2 decoder) "
        "has the names above with these differences. SigLIP has no class token, so `vpos` is "
        "the patches only and `vision.hook_embed` holds patches + positions; the patch "
        "embedding has a bias; the features are read before SigLIP's post-norm, so no final "
        "vision norm is built. The decoder's `attn.hook_q/k/v` include Qwen2's q/k/v biases. "
        f"Absent: {', '.join(f'`{n}`' for n in absent)}. Added (shapes on one 64x64 image "
        f"of a tiny random OneVision: {geometry.n_tiles(size)} tiles of "
        f"{geometry.grid}x{geometry.grid} patches, the {kept.row_stop - kept.row_start}x"
        f"{kept.col_stop - kept.col_start} kept grid downscaled to {packed.rows}x{packed.cols} "
        f"by `anyres_max_{geometry.max_tiles}`, {n_image} image tokens):",
        "", "| hook | shape on the example | what it holds |", "|---|---|---|",
    ]
    lines += [f"| `{n}` | `[{', '.join(map(str, cache[n].shape))}]` | {describe(n)} |"
              for n in added]
    return lines


def generate_page() -> str:
    torch.manual_seed(0)
    model = load_model()
    question, batches = example_inputs(model)
    shapes = {key: cached_shapes(model, batch) for key, batch in batches.items()}
    page = render(model, question, batches["one"], rows(model, shapes))
    return page + "\n".join(family_section(model)) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the committed page instead of writing it")
    args = parser.parse_args(argv)
    page = generate_page()
    if args.check:
        if PAGE.read_text() != page:
            print(f"{PAGE} is out of date: run python docs/gen_hooks.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(page)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
