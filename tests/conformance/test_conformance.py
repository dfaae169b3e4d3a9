"""Every check on every family that has a tiny builder (``mmlens.zoo.tiny``): parity with HF's
own model on the processor's outputs (and on each module's ``VARIANTS``), padded batch =
singles, generation, HF's keyword names at the door, several images and text-only prompts,
knockouts against HF eager attention with an edited mask, fast sweep = naive, the lens's last
point = the logits, vision-tower spans, and ``mmlens flow`` end to end on a saved checkpoint."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from families import (
    VARIANTS,
    hf_cross_attention,
    hf_decoder_layers,
    hf_tower_slots,
    hf_vision_layers,
    hf_vision_rows,
    images_argument,
    processor_inputs,
    prompts,
    random_images,
)

from mmlens import HookedMultimodalTransformer
from mmlens.cli import main
from mmlens.core.errors import MMLensError
from mmlens.experiments import DEFAULT_FLOWS, information_flow
from mmlens.inputs.templates import IMAGE_PLACEHOLDER
from mmlens.methods import block_attention, causal_map
from mmlens.methods.lens import decode, lens_names, residual_stack
from mmlens.model.families import FAMILIES as REGISTERED
from mmlens.zoo import tiny_checkpoint
from mmlens.zoo.tiny import tiny_families, tiny_hf_model, tiny_module, tiny_processor
from mmlens.zoo.tiny.tokenizer import QUESTIONS


def _real(inputs):
    return inputs["attention_mask"].bool()


def test_every_registered_family_has_a_tiny_builder():
    missing = sorted(set(REGISTERED) - set(tiny_families()))
    assert not missing, f"add mmlens/zoo/tiny/<family>.py for {missing}"


# ---------------------------------------------------------------- parity with HF
def check_parity(module, hf, model, inputs) -> None:
    """Logits <= 1e-4, every residual stream and every vision block <= 1e-5, the processor's
    outputs fed to both models under HF's names."""
    real = _real(inputs)
    captured = {}
    handles = [layer.register_forward_hook(
        lambda mod, args, out, i=i: captured.__setitem__(i, out[0] if isinstance(
            out, tuple) else out)) for i, layer in enumerate(hf_vision_layers(module, hf))]
    try:
        with torch.no_grad():
            ref = hf(**inputs, output_hidden_states=True)
            logits, cache = model.run_with_cache(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    assert (ref.logits - logits)[real].abs().max() <= 1e-4
    n_layers = model.cfg.n_layers
    for layer in range(n_layers):
        ours = cache[f"blocks.{layer}.hook_resid_pre"]
        injected = f"blocks.{layer - 1}.hook_deepstack"  # HF records a layer's output before
        if injected in cache:  # the features injected after it (Qwen3-VL's DeepStack)
            ours = ours - cache[injected]
        assert (ref.hidden_states[layer] - ours)[real].abs().max() <= 1e-5, layer
    final = model.ln_final(cache[f"blocks.{n_layers - 1}.hook_resid_post"])
    assert (ref.hidden_states[n_layers] - final)[real].abs().max() <= 1e-5
    n_vision = model.cfg.vision.n_layers  # LLaVA runs the tower up to its feature layer
    assert 0 < n_vision <= len(captured)
    rows = hf_vision_rows(module, hf, inputs)
    for layer in range(n_vision):
        theirs = captured[layer]
        ours = cache[f"vision.blocks.{layer}.hook_resid_post"]
        if rows is not None:
            ours = ours.reshape(-1, ours.shape[-1])[rows]
        assert (theirs - ours.reshape(theirs.shape)).abs().max() <= 1e-5, f"vision {layer}"


def test_float32_parity_with_hf_on_the_processor_outputs(tiny):
    assert len({int(n) for n in tiny.inputs["attention_mask"].sum(-1)}) > 1  # left padding
    check_parity(tiny.module, tiny.hf, tiny.model, tiny.inputs)


@pytest.mark.parametrize("family, variant", VARIANTS)
def test_float32_parity_on_every_variant(family, variant):
    """The module's ``VARIANTS`` (feature layers, strategies, rope scaling, tile sizes...)."""
    module = tiny_module(family)
    hf = tiny_hf_model(family, seed=1, **module.VARIANTS[variant])
    processor = tiny_processor(family, hf.config)
    model = HookedMultimodalTransformer.from_hf_model(hf, processor)
    images = random_images(module)
    inputs = processor_inputs(model, images,
                              [QUESTIONS[i % len(QUESTIONS)] for i in range(len(images))])
    check_parity(module, hf, model, inputs)


def test_padded_batch_equals_each_example_alone(tiny):
    with torch.no_grad():
        batched = tiny.model(**tiny.inputs)
        for row in range(len(tiny.images)):
            alone = tiny.model(**tiny.single(row))
            assert (alone[0] - batched[row, -alone.shape[1]:]).abs().max() <= 1e-5, row


def test_generate_matches_hf_greedy(tiny):
    inputs = tiny.inputs
    ref = tiny.hf.generate(**inputs, max_new_tokens=5, do_sample=False,
                           pad_token_id=tiny.processor.tokenizer.pad_token_id, eos_token_id=None)
    ours = tiny.model.generate(**inputs, max_new_tokens=5, eos_token_id=None)
    assert torch.equal(ref, ours)


# ---------------------------------------------------------------- HF at the door
def test_hf_names_reach_every_entry_point(tiny):
    """``model(**outputs)``, ``run_with_cache`` and ``run_with_hooks`` take the processor's
    outputs as they come; a hook sees and edits the same run."""
    with torch.no_grad():
        logits = tiny.model(**tiny.inputs)
        cached, _ = tiny.model.run_with_cache(**tiny.inputs, names_filter="hook_embed")
        zeroed = tiny.model.run_with_hooks(
            **tiny.inputs, fwd_hooks=[("hook_embed", lambda x, hook: x * 0)])
    assert torch.equal(logits, cached)
    assert not torch.allclose(logits, zeroed)


def test_unknown_keyword_is_refused_naming_the_accepted_ones(tiny):
    with pytest.raises(MMLensError, match="pixel_values") as error:
        tiny.model(**tiny.inputs, pixel_value=tiny.inputs["pixel_values"])
    assert "'pixel_value'" in str(error.value)
    sizes_key = tiny.model.family.image_sizes_key
    grid = torch.ones(len(tiny.images), 3, dtype=torch.long)
    if sizes_key == "image_sizes":  # another family's geometry name
        with pytest.raises(MMLensError, match="image_sizes"):
            tiny.model(**tiny.inputs, image_grid_thw=grid)
    else:  # the geometry twice, under both names
        with pytest.raises(MMLensError, match="pass one"):
            tiny.model(**tiny.inputs, image_sizes=tiny.inputs[sizes_key])


def test_several_images_and_a_text_only_prompt_match_hf(tiny):
    """``prepare`` with two images in one prompt and none in the other: HF's model on the
    processor's outputs for the same prompts gives the same logits; each image has its span."""
    model, images = tiny.model, tiny.images[:2]
    batch = model.prepare([images, None], tiny.questions[:2])
    spans = batch.spans[0]
    assert torch.equal(torch.cat([spans["image_0"], spans["image_1"]]), spans["image"])
    assert len(batch.spans[1]["image"]) == 0 and "image_0" not in batch.spans[1]
    image = model.processor.tokenizer.convert_ids_to_tokens(model.cfg.image_token_id)
    text = [prompt.replace(IMAGE_PLACEHOLDER, image) for prompt in batch.prompts]
    inputs = dict(model.processor(images=images_argument(model, [images, []]), text=text,
                                  padding=True, return_tensors="pt"))
    with torch.no_grad():
        ours = model(batch)
        reference = tiny.hf(**inputs).logits
    for row in range(2):
        n = int(batch.attention_mask[row].sum())
        assert torch.equal(batch.input_ids[row, -n:], inputs["input_ids"][row, -n:])
        assert (ours[row, -n:] - reference[row, -n:]).abs().max() <= 1e-4, row


# ---------------------------------------------------------------- prepared batches
@pytest.fixture(scope="module")
def prepared(tiny):
    """``prepare`` on three of the family's images with one box each (spans related /
    other), and the processor's outputs for the same prompts (the same tokens)."""
    sizes = tiny.module.IMAGE_SIZES[:3]
    boxes = [[(2, 2, size.width // 2, size.height // 2)] for size in sizes]
    batch = tiny.model.prepare(tiny.images[:3], tiny.questions[:3], boxes=boxes)
    inputs = processor_inputs(tiny.model, tiny.images[:3], tiny.questions[:3])
    assert torch.equal(batch.input_ids * batch.attention_mask,
                       inputs["input_ids"] * inputs["attention_mask"])
    return batch, inputs


def test_prepare_matches_the_processor_outputs(tiny, prepared):
    batch, inputs = prepared
    with torch.no_grad():
        assert (tiny.model(batch) - tiny.model(**inputs))[_real(inputs)].abs().max() <= 1e-5


def _hf_logits_with_mask_edit(tiny, inputs, layers, blocked, image_keys=False):
    """HF's logits with ``blocked(row) -> (dst, src, heads)`` cut from the eager attention
    mask of ``layers``. On a model whose image reaches the text by cross-attention, the
    self-attention layers of ``layers`` are cut, or with ``image_keys`` (``src``: key indices,
    None for every key) its cross-attention layers, where a row and head whose every key is
    then cut gets zero output (the rule of ``mmlens.model.components.cross_attention``)."""
    n_heads = tiny.model.cfg.n_heads
    cross = [layer for layer in layers if hf_cross_attention(tiny.module, tiny.hf, layer)]
    if image_keys:
        return _hf_logits_with_cross_edit(tiny, inputs, cross, blocked)
    layers = [layer for layer in layers if layer not in cross]

    def edit(module, args, kwargs):
        mask = kwargs["attention_mask"]
        n, q_len = kwargs["hidden_states"].shape[:2]
        mask = mask.expand(n, n_heads, q_len, mask.shape[-1]).clone()
        cut = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
        for row in range(n):
            dst, src, heads = blocked(row)
            for head in heads:
                mask[row, head, dst[:, None], src[None, :]] = cut
        kwargs["attention_mask"] = mask
        return args, kwargs

    decoder = hf_decoder_layers(tiny.module, tiny.hf)
    return _hf_logits_with(tiny, inputs, [
        decoder[layer].self_attn.register_forward_pre_hook(edit, with_kwargs=True)
        for layer in layers])


def _hf_logits_with(tiny, inputs, handles):
    """HF's logits on ``inputs`` with the hooks of ``handles``, which are removed after."""
    try:
        with torch.no_grad():
            return tiny.hf(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()


def _hf_logits_with_cross_edit(tiny, inputs, layers, blocked):
    """HF's logits with ``blocked(row) -> (dst, keys or None for all, heads)`` cut from the
    cross-attention mask of ``layers``, a (row, head) then cut from every key zeroed before
    ``o_proj``."""
    n_heads, d_head = tiny.model.cfg.n_heads, tiny.model.cfg.d_head
    zeroed = {}

    def edit(layer):
        def pre(module, args, kwargs):
            mask = kwargs["attention_mask"]
            low = torch.finfo(mask.dtype).min
            n, _, q_len, k_len = mask.shape
            mask = mask.expand(n, n_heads, q_len, k_len).clone()
            before = (mask == low).all(-1)
            for row in range(n):
                dst, src, heads = blocked(row)
                for head in heads:
                    if src is None:
                        mask[row, head, dst] = low
                    else:
                        mask[row, head, dst[:, None], src[None, :]] = low
            zeroed[layer] = (mask == low).all(-1) & ~before  # [n, heads, q]
            kwargs["attention_mask"] = mask
            return args, kwargs

        def zero_heads(module, args):
            z = args[0].view(*args[0].shape[:2], n_heads, d_head)
            return (z.masked_fill(zeroed[layer].transpose(1, 2)[..., None], 0).flatten(2),)

        module = hf_cross_attention(tiny.module, tiny.hf, layer)
        return [module.register_forward_pre_hook(pre, with_kwargs=True),
                module.o_proj.register_forward_pre_hook(zero_heads)]

    return _hf_logits_with(tiny, inputs, [handle for layer in layers for handle in edit(layer)])


@pytest.mark.parametrize("src, dst, layers, heads", [
    ("image", "last", [0, 2], None),
    ("related", "question", [1], None),
    ("image", "question", [0, 1], [1, 3]),
    ("image_newline", "question", [0, 1, 2], [1, 3]),  # where the family has newlines
])
def test_block_attention_is_hf_eager_attention_with_an_edited_mask(tiny, prepared, src, dst,
                                                                   layers, heads):
    batch, inputs = prepared
    if src not in batch.span_names:
        pytest.skip(f"{tiny.name} has no span {src!r}")
    every = range(tiny.model.cfg.n_heads)
    # Where the image is not in the prompt, an image source is its cross-attention keys.
    keys = src == "image" and not batch.image_layout.in_sequence or src in batch.key_spans
    reference = _hf_logits_with_mask_edit(tiny, inputs, layers, lambda row: (
        batch.positions(dst, row),
        None if keys and src == "image" else batch.positions(src, row), heads or every),
        image_keys=keys)
    with torch.no_grad():
        ours = tiny.model.run_with_hooks(batch, fwd_hooks=block_attention(
            src, dst, layers, batch=batch, heads=heads, model=tiny.model))
        clean = tiny.model(batch)
    real = batch.attention_mask.bool()
    assert (ours - reference)[real].abs().max() <= 1e-4
    assert (ours - clean)[real].abs().max() > 1e-4  # the knockout did something


def test_fast_sweep_equals_naive(tiny, prepared):
    """Every default flow, plus the flows of the family's own spans (``image_newline``)."""
    batch, _ = prepared
    flows = (*DEFAULT_FLOWS, *(f"image_newline->{dst}" for dst in ("question", "last")
                               if "image_newline" in batch.span_names))
    kwargs = dict(flows=flows, window=1, only_correct=False, progress=False)
    fast = information_flow(tiny.model, batch, batch_size=4, **kwargs)
    naive = information_flow(tiny.model, batch, method="naive", **kwargs)
    assert len(fast) == len(batch) * len(flows) * tiny.model.cfg.n_layers
    assert fast[["example_id", "flow", "layer"]].equals(naive[["example_id", "flow", "layer"]])
    assert (fast.p_block - naive.p_block).abs().max() < 1e-5
    assert fast.rel_change.abs().max() > 0  # the knockouts change the prediction


def test_the_lens_last_point_is_the_logits(tiny, prepared):
    model, (batch, _) = tiny.model, prepared
    with torch.no_grad():
        logits, cache = model.run_with_cache(batch, names_filter=lens_names(model))
    every = list(range(batch.input_ids.shape[1]))
    stack, index = residual_stack(cache, layers=[model.cfg.n_layers - 1], positions=every)
    expected = logits[torch.tensor(index["example"]), torch.tensor(index["position"])]
    assert (decode(model, stack[0]) - expected).abs().max() <= 1e-5


def test_causal_map_equals_one_forward_per_region(tiny, prepared):
    """The batched causal map (2x2 cells of image tokens blocked from the last position in
    one layer) equals one full forward per region with ``block_attention`` (where the image
    is not in the prompt, a region is a span of its cross-attention keys)."""
    batch, _ = prepared
    one = batch.select(0)
    keys = None if one.image_layout.in_sequence else len(one.token_maps[0][0])
    layers = [min(1, tiny.model.cfg.n_layers - 1)]
    frame = causal_map(tiny.model, one, "last", layers=layers, cell=2, images=tiny.images[:1])
    assert len(frame) > 0
    with torch.no_grad():
        token = int(tiny.model(one)[0, -1].argmax())
        naive = []
        for positions in frame.position:
            one.add_span("region", [list(positions)], keys=keys)
            hooks = block_attention("region", "last", layers, batch=one, model=tiny.model)
            logits = tiny.model.run_with_hooks(one, fwd_hooks=hooks)[0, -1].float()
            naive.append(float(logits.softmax(-1)[token]))
    assert (torch.tensor(frame.p_block.to_numpy()) - torch.tensor(naive)).abs().max() <= 1e-6


def test_vision_spans_index_the_towers_patches(tiny, prepared):
    """Every image's vision-tower positions are patches of its tower row: inside the row and
    past its class tokens (CLIP has one, SigLIP and Qwen's packed tower none)."""
    batch, _ = prepared
    with torch.no_grad():
        _, cache = tiny.model.run_with_cache(batch, names_filter="vision.blocks.0.hook_resid_pre")
    n_rows, n_seq = cache["vision.blocks.0.hook_resid_pre"].shape[:2]
    slots = hf_tower_slots(tiny.module, tiny.hf, n_seq)
    positions = batch.vision_positions("image", tiny.model)
    assert len(positions) == n_rows
    for row in positions:
        assert len(row) and set(row.tolist()) <= slots


# ---------------------------------------------------------------- a saved checkpoint
def test_flow_runs_end_to_end_on_a_saved_tiny_checkpoint(tiny, tmp_path):
    folder = tiny_checkpoint(tiny.name, tmp_path / "model")
    model = HookedMultimodalTransformer.from_pretrained(str(folder))
    hf = type(tiny.hf).from_pretrained(folder).eval()
    text = prompts(model, tiny.questions[:1])
    inputs = dict(model.processor(images=tiny.images[:1], text=text, return_tensors="pt"))
    with torch.no_grad():
        assert (model(**inputs) - hf(**inputs).logits).abs().max() <= 1e-4
    out = tmp_path / "run"
    code = main(["flow", "--model", str(folder), "--per-task", "1", "--no-filter", "--quiet",
                 "--tasks", "ChooseAttr,QueryAttr", "--out", str(out)])
    assert code == 0
    flow = pd.read_csv(out / "flow.csv")
    assert set(flow.flow) == set(DEFAULT_FLOWS)
    assert len(flow) == 2 * len(DEFAULT_FLOWS) * model.cfg.n_layers
    assert flow.p_block.between(0, 1).all()
    run = json.loads((out / "run.json").read_text())  # provenance: what made these numbers
    assert run["n_examples"] == 2 and run["n_layers"] == model.cfg.n_layers
    assert run["versions"]["mmlens"] and len(run["weights_sha256"]) == 64
    assert (out / "report.html").is_file()
