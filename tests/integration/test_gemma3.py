"""Gemma 3 against Hugging Face's own model on the tiny config (``mmlens.zoo.tiny.gemma3``):
sliding-window layers (window 4) and global ones with their own rotary bases, grouped-query
attention, images pooled to 16 tokens that attend to each other both ways. What is Gemma 3's
own (HF's processor, masks, pan-and-scan, resuming, bf16, hooks); the conformance suite
(``tests/conformance``) checks parity, generation, the lens, knockouts and the flow."""

import pytest
import torch
from PIL import Image

from mmlens import HookedMultimodalTransformer
from mmlens.core.errors import MMLensError
from mmlens.methods import block_attention
from mmlens.model.language import positions_from_mask
from mmlens.zoo.tiny import gemma3 as tiny
from mmlens.zoo.tiny import tiny_hf_model, tiny_processor

PROMPT = "<start_of_turn>user\n<start_of_image>{}<end_of_turn>\n<start_of_turn>model\n"
QUESTIONS = ("What color is the square?", "Which shape is red?")


def _images(n: int) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(1)
    return [Image.fromarray((torch.rand(size.height, size.width, 3, generator=generator) * 255)
                            .byte().numpy()) for size in tiny.IMAGE_SIZES[:n]]


def _inputs(hf, n: int = 2) -> dict:
    """HF's processor: a left-padded batch of different images, with its token_type_ids."""
    processor = tiny.hf_processor(hf.config)
    return processor(images=[[image] for image in _images(n)],
                     text=[PROMPT.format(q) for q in QUESTIONS[:n]], return_tensors="pt",
                     padding=True)


def _hf(inputs, hf, **kwargs):
    return hf(**inputs, position_ids=positions_from_mask(inputs["attention_mask"]), **kwargs)


@pytest.fixture(scope="module")
def pair():
    hf = tiny_hf_model("gemma3")
    return hf, HookedMultimodalTransformer.from_hf_model(hf, tiny_processor("gemma3", hf.config))


@torch.no_grad()
def test_composed_processor_gives_hfs_inputs_and_the_sdpa_forward_equals_hfs(pair):
    """The processor ``from_pretrained`` composes gives HF's ``Gemma3Processor``'s inputs (the
    same tokens, pixels and token types: 1 at image tokens); the SDPA forward equals HF's SDPA
    (the suite compares the cached run with HF eager)."""
    hf, model = pair
    inputs = _inputs(hf)
    assert not bool(inputs["attention_mask"].all())  # the batch is padded
    images = _images(2)
    # HF's processor puts each image's soft tokens, with blank lines, at <start_of_image>
    image = f"\n\n<start_of_image>{model.processor.image_token}<end_of_image>\n\n"
    text = [PROMPT.replace("<start_of_image>", image).format(q) for q in QUESTIONS]
    ours = model.processor(images=images, text=text, return_tensors="pt", padding=True)
    assert set(ours) == set(inputs) - {"num_crops"}
    for key in ours:
        assert torch.equal(ours[key], inputs[key]), key
    real = inputs["attention_mask"].bool()
    logits = model(**ours)
    assert (_hf(inputs, hf).logits - logits)[real].abs().max() <= 1e-4


@torch.no_grad()
def test_masks_are_bidirectional_in_an_image_and_cut_to_the_window(pair):
    hf, model = pair
    inputs = _inputs(hf, 1)
    _, cache = model.run_with_cache(inputs["input_ids"], inputs["pixel_values"],
                                    names_filter=lambda name: name.endswith("hook_mask"))
    image = (inputs["input_ids"][0] == model.cfg.image_token_id).nonzero().flatten()
    last = inputs["input_ids"].shape[1] - 1
    for layer, kind in enumerate(model.cfg.text.layer_types):
        mask = cache[f"blocks.{layer}.attn.hook_mask"][0, 0]
        assert bool(mask[image[0], image[-1]])  # the first image token sees the last one
        assert not bool(mask[image[-1] + 1, image[-1] + 2])  # text stays causal
        assert bool(mask[last, 0]) == (kind == "full_attention")  # the window of 4


def _eager_knockout(hf, inputs, blocked: dict[int, list[tuple[int, int]]]):
    """HF's eager model with its own masks, the (query, key) edges of each layer blocked."""
    hf.set_attn_implementation("eager")
    handles = []
    for layer, edges in blocked.items():
        def edit(module, args, kwargs, edges=edges):
            mask = kwargs["attention_mask"].clone()
            for query, key in edges:
                if mask.dtype == torch.bool:
                    mask[:, :, query, key] = False
                else:
                    mask[:, :, query, key] = torch.finfo(mask.dtype).min
            return args, {**kwargs, "attention_mask": mask}

        attn = hf.model.language_model.layers[layer].self_attn
        handles.append(attn.register_forward_pre_hook(edit, with_kwargs=True))
    try:
        return _hf(inputs, hf).logits
    finally:
        for handle in handles:
            handle.remove()
        hf.set_attn_implementation("sdpa")


@torch.no_grad()
def test_knockout_equals_hf_eager_with_only_the_blocked_edges_added(pair):
    hf, model = pair
    inputs = _inputs(hf, 1)
    image = (inputs["input_ids"][0] == model.cfg.image_token_id).nonzero().flatten().tolist()
    last = inputs["input_ids"].shape[1] - 1
    # image -> last in the global layers; in layer 0 (sliding) the first image token stops
    # seeing the last one but keeps the rest of its image
    hooks = (block_attention(image, [last], [2, 4])
             + block_attention([image[-1]], [image[0]], [0]))
    ours = model.run_with_hooks(inputs["input_ids"], inputs["pixel_values"], fwd_hooks=hooks)
    to_last = [(last, key) for key in image]
    ref = _eager_knockout(hf, inputs, {2: to_last, 4: to_last, 0: [(image[0], image[-1])]})
    clean = _hf(inputs, hf).logits
    assert (ref - clean).abs().max() > 1e-3  # the knockout changes the answer
    assert (ours - ref).abs().max() <= 1e-4


@torch.no_grad()
def test_resuming_needs_the_image_positions(pair):
    hf, model = pair
    inputs = _inputs(hf, 1)
    logits, cache = model.run_with_cache(inputs["input_ids"], inputs["pixel_values"])
    resid = cache["blocks.1.hook_resid_pre"]
    with pytest.raises(MMLensError, match="token_type_ids"):
        model(resid, start_at_layer=1)
    resumed = model(resid, start_at_layer=1, token_type_ids=inputs["token_type_ids"])
    assert (resumed - logits).abs().max() <= 1e-5


def test_bfloat16_runs_close_to_hf():
    hf = tiny_hf_model("gemma3", dtype=torch.bfloat16)
    model = HookedMultimodalTransformer.from_hf_model(hf)
    inputs = _inputs(hf)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        ref = _hf(inputs, hf).logits
        logits = model(inputs["input_ids"], inputs["pixel_values"],
                       attention_mask=inputs["attention_mask"])
    assert logits.dtype == torch.bfloat16
    real = inputs["attention_mask"].bool()
    assert (ref.float().softmax(-1) - logits.float().softmax(-1))[real].abs().max() <= 2e-2


@torch.no_grad()
def test_every_hook_is_on_the_data_path(pair):
    hf, model = pair
    inputs = _inputs(hf, 1)
    names = list(model.hook_dict)
    for name in ("blocks.0.ln1_post.hook_scale", "blocks.0.ln2_post.hook_normalized",
                 "blocks.0.attn.hook_q_normed", "blocks.0.attn.k_norm.hook_scale",
                 "vision.ln_post.hook_scale", "projector.hook_pooled",
                 "projector.norm.hook_scale", "projector.hook_out",
                 "vision.blocks.1.hook_resid_post"):
        assert name in names
    clean = model(inputs["input_ids"], inputs["pixel_values"])
    for name in names:
        def nudge(x, hook):
            if x.dtype == torch.bool:  # a mask: each query sees itself only
                return x & torch.eye(*x.shape[-2:], dtype=torch.bool)
            # not a uniform scale or shift, which a following norm would undo
            return x * 1.25 + 0.05 * torch.linspace(-1, 1, x.shape[-1], dtype=x.dtype)

        out = model.run_with_hooks(inputs["input_ids"], inputs["pixel_values"],
                                   fwd_hooks=[(name, nudge)])
        assert (out - clean).abs().max() > 1e-6, name



@torch.no_grad()
def test_pan_and_scan_crops_are_blocks_of_their_own(pair):
    """HF's processor with pan-and-scan on: the image and its crops, each its own block."""
    hf, model = pair
    generator = torch.Generator().manual_seed(3)
    wide = Image.fromarray((torch.rand(30, 100, 3, generator=generator) * 255).byte().numpy())
    inputs = tiny.hf_processor(hf.config)(
        images=[[wide]], text=[PROMPT.format(QUESTIONS[0])], return_tensors="pt",
        do_pan_and_scan=True, pan_and_scan_min_crop_size=16, pan_and_scan_max_num_crops=3)
    inputs.pop("num_crops", None)
    assert inputs["pixel_values"].shape[0] == 4  # the image and 3 crops
    hf.set_attn_implementation("eager")
    try:
        ref = _hf(inputs, hf, output_hidden_states=True)
    finally:
        hf.set_attn_implementation("sdpa")
    logits, cache = model.run_with_cache(inputs["input_ids"], inputs["pixel_values"])
    assert (ref.logits - logits).abs().max() <= 1e-4
    for layer in range(model.cfg.n_layers):
        ours = cache[f"blocks.{layer}.hook_resid_pre"]
        assert (ref.hidden_states[layer] - ours).abs().max() <= 1e-5, layer
    mask = cache["blocks.2.attn.hook_mask"][0, 0]  # a global layer
    image = (inputs["input_ids"][0] == model.cfg.image_token_id).nonzero().flatten()
    n = hf.config.mm_tokens_per_image  # each crop's tokens: a block of their own
    assert bool(mask[image[0], image[n - 1]]) and not bool(mask[image[0], image[n]])


@torch.no_grad()
def test_residual_directions_fold_gemmas_norm_gain(pair):
    hf, model = pair
    inputs = _inputs(hf, 1)
    logits, cache = model.run_with_cache(inputs["input_ids"], inputs["pixel_values"])
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][0, -1]
    token = int(logits[0, -1].argmax())
    direction = model.tokens_to_residual_directions(token)
    scale = cache["ln_final.hook_scale"][0, -1]
    assert abs(float((final / scale) @ direction) - float(logits[0, -1, token])) <= 1e-4
