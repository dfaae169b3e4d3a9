"""Llama-3.2-Vision in the study's entry points: its preset, ``mmlens hooks`` on a saved tiny
folder, and a run resumed on a key/value cache that holds the image keys."""

import pytest
import torch
from PIL import Image

from mmlens import HookedMultimodalTransformer
from mmlens.cli import main
from mmlens.core.errors import MMLensError
from mmlens.inputs.templates import MLLAMA
from mmlens.methods.clean_run import clean_run
from mmlens.zoo.tiny import tiny_checkpoint


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_checkpoint("mllama", tmp_path_factory.mktemp("mllama") / "model")


def test_the_preset_uses_the_familys_prompt_and_a_scaled_window():
    from mmlens.experiments.presets import PRESETS
    from mmlens.methods.windows import default_window

    preset = PRESETS["meta-llama/Llama-3.2-11B-Vision-Instruct"]
    assert preset.template is MLLAMA and preset.preprocessing == "tiles"
    assert (preset.n_layers, preset.window) == (40, default_window(40))


def test_hooks_lists_the_cross_attention_and_tower_hooks(folder, capsys):
    assert main(["hooks", "--model", str(folder)]) == 0
    listed = capsys.readouterr().out
    for name in ("vision.pre_tile.hook_embed", "vision.global_blocks.1.hook_attn_gate",
                 "blocks.1.cross_attn.hook_mask", "blocks.2.hook_mlp_gate",
                 "blocks.3.attn.hook_pattern"):
        assert name in listed


def test_a_run_resumed_on_the_cache_reads_the_image_keys_it_holds(folder):
    """From the clean run's cache, the positions from the question on resumed at layer 0
    (before both cross-attention layers) give the clean logits; without a cache the resume is
    refused."""
    model = HookedMultimodalTransformer.from_pretrained(str(folder))
    batch = model.prepare(Image.new("RGB", (37, 29), "red"), "What color is the square?")
    clean = clean_run(model, batch)
    start = int(batch.positions("question", 0)[0])
    with torch.no_grad():
        final = model(clean.resid[0][:, start:], start_at_layer=0,
                      stop_at_layer=model.cfg.n_layers, past_kv_cache=clean.cache.truncate(start),
                      position_ids=clean.position_ids[..., start:],
                      attention_mask=torch.ones(1, clean.n_positions - start, dtype=torch.long))
        logits = model.unembed(model.ln_final(final))[0, -1]
        full = model(batch)[0, -1]
    assert (logits - full).abs().max() <= 1e-5
    with pytest.raises(MMLensError, match="cross-attention layers"):
        model(clean.resid[0][:, start:], start_at_layer=0)


@pytest.fixture(scope="module")
def model(folder):
    return HookedMultimodalTransformer.from_pretrained(str(folder))


def _boxed(model, colour):
    image = Image.new("RGB", (37, 29), colour)
    return model.prepare([image], ["What color is the square?"], boxes=[[(4, 4, 12, 10)]])


def test_patching_the_question_equals_a_full_forward_with_its_residual_patched_in(model):
    """``patch_spans`` resumes runs on the corrupted run's cache, through the cross-attention
    layers (the cache holds the image keys): equal to one full corrupted forward per layer
    with the question's residual stream replaced by the clean run's."""
    from mmlens.methods.patching import patch_spans

    clean, corrupted = _boxed(model, "red"), _boxed(model, "blue")
    token = int(model(clean)[0, -1].argmax())

    def metric(logits):
        return logits[:, -1].log_softmax(-1)[:, token]

    scores = patch_spans(model, clean, corrupted, metric, spans=["question"])
    question = clean.positions("question", 0)
    _, cache = model.run_with_cache(clean)
    for layer in range(model.cfg.n_layers):
        def replace(resid, hook, layer=layer):
            resid = resid.clone()
            resid[:, question] = cache[f"blocks.{layer}.hook_resid_pre"][:, question]
            return resid
        with torch.no_grad():
            logits = model.run_with_hooks(corrupted, fwd_hooks=[
                (f"blocks.{layer}.hook_resid_pre", replace)])
        assert abs(float(scores[layer, 0]) - float(metric(logits)[0])) <= 1e-4, layer


def test_methods_reading_prompt_positions_refuse_a_span_of_image_keys(model):
    from mmlens.methods.edge_attribution import edge_attribution
    from mmlens.methods.knockout import resolve_positions
    from mmlens.methods.patching import patch_spans

    clean, corrupted = _boxed(model, "red"), _boxed(model, "blue")
    assert clean.key_spans == {"related", "other"}
    with pytest.raises(MMLensError, match="cross-attention keys"):
        patch_spans(model, clean, corrupted, lambda logits: logits[:, -1, 0], spans=["related"])
    with pytest.raises(MMLensError, match="cross-attention keys"):  # the lens, causal maps...
        resolve_positions("related", clean, role="positions")
    with pytest.raises(MMLensError, match="cross-attention keys"):
        edge_attribution(model, clean, lambda logits: logits[:, -1, 0],
                         flows=["question->related"])


def test_key_spans_keep_their_indices_when_a_batch_is_cut_down(model):
    images = [Image.new("RGB", (37, 29), "red"), Image.new("RGB", (13, 30), "blue")]
    batch = model.prepare(images, ["What color is the square?", "Which shape?"],
                          boxes=[[(4, 4, 12, 10)], [(2, 10, 6, 8)]])
    one = batch.select(1)
    assert torch.equal(one.positions("related", 0), batch.positions("related", 1))
    assert not torch.equal(one.positions("question", 0), batch.positions("question", 1))


def _patched_prob(model, batch, token, hooks):
    with torch.no_grad():
        logits = model.run_with_hooks(batch, fwd_hooks=hooks)
    return float(logits[0, -1].softmax(-1)[token])


def test_a_causal_map_patch_reads_the_regions_keys_from_the_corrupted_image(model):
    """Over every layer: each region's rows of the projected vision features
    (``projector.hook_out``, one row per key) taken from the corrupted run, by hand; in a
    window holding one cross-attention layer, that layer's keys and values of the region; a
    window without one changes nothing."""
    from mmlens.methods import causal_map

    clean, corrupted = _boxed(model, "red"), _boxed(model, "blue")
    _, cache = model.run_with_cache(corrupted, names_filter=lambda n: n in (
        "projector.hook_out", "blocks.1.cross_attn.hook_k", "blocks.1.cross_attn.hook_v"))
    regions = ["related", "other"]
    frame = causal_map(model, clean, mode="patch", corrupted=corrupted, regions=regions,
                       images=[(37, 29)])
    token = int(model(clean)[0, -1].argmax())

    def rows(keys, names):
        def write(activation, hook):
            flat = activation.clone().reshape(-1, *activation.shape[-1:]) \
                if hook.name == "projector.hook_out" else activation.clone()
            source = cache[hook.name].reshape(flat.shape) if hook.name == "projector.hook_out" \
                else cache[hook.name]
            if hook.name == "projector.hook_out":
                flat[keys] = source[keys]
            else:
                flat[:, keys] = source[:, keys]
            return flat.reshape(activation.shape)
        return [(name, write) for name in names]

    for row in frame.itertuples():
        keys = clean.positions(row.region, 0)
        assert row.position == keys.tolist()
        expected = _patched_prob(model, clean, token, rows(keys, ["projector.hook_out"]))
        assert abs(row.p_block - expected) <= 1e-6
    assert (frame["p_block"] - frame["p_base"]).abs().max() > 1e-6
    one = causal_map(model, clean, mode="patch", corrupted=corrupted, regions=regions,
                     images=[(37, 29)], layers=[0, 1])
    for row in one.itertuples():
        expected = _patched_prob(model, clean, token, rows(
            clean.positions(row.region, 0),
            ["blocks.1.cross_attn.hook_k", "blocks.1.cross_attn.hook_v"]))
        assert abs(row.p_block - expected) <= 1e-6
    none = causal_map(model, clean, mode="patch", corrupted=corrupted, regions=regions,
                      images=[(37, 29)], layers=[3])
    assert (none["p_block"] - none["p_base"]).abs().max() <= 1e-6
    tall = model.prepare([Image.new("RGB", (13, 30), "blue")], ["What color is the square?"])
    with pytest.raises(MMLensError, match="tiled alike"):
        causal_map(model, clean, mode="patch", corrupted=tall, regions=regions,
                   images=[(37, 29)])


def test_maps_from_the_inputs_alone_follow_the_aspect_ratio_ids(model):
    """Without the original images (``input_maps``), each example's tiles are read off its
    aspect ratio id in HF's (rows, cols) order: a wide image is one row of two tiles."""
    layout = model.family.image_layout(model)
    batch = model.prepare([Image.new("RGB", (45, 19)), Image.new("RGB", (13, 30))],
                          ["What color?", "Which shape?"])
    wide, tall = (maps[0] for maps in layout.input_maps(batch))
    assert wide.image_size == (32, 16) and tall.image_size == (16, 32)
    assert [f.shift for f in wide.frames] == [(0, 0), (-16, 0)]
    assert [f.shift for f in tall.frames] == [(0, 0), (0, -16)]


def test_word_maps_default_to_every_tile_patch_and_equal_the_causal_map(model):
    """Without ``grid=``, a word's map covers every key made from pixels (the tiles' patches,
    not their class tokens nor the padding tiles), each value the causal map's for that key."""
    from mmlens.methods import causal_map
    from mmlens.methods.word_maps import word_maps

    batch = _boxed(model, "red")
    token_map = batch.token_maps[0][0]
    keys = token_map.sees_pixels().nonzero().flatten()
    maps = word_maps(model, batch, [1, 2], span="last")
    assert len(maps) == 1 and len(maps[0]["values"]) == len(keys)
    frame = causal_map(model, batch, dst="last", layers=[1, 2], images=[(37, 29)],
                       regions={"k": [keys[:1]]})
    assert maps[0]["values"][0] == round(float(frame["value"].iloc[0]), 6)


def test_image_attention_reads_the_cross_attention_over_the_tile_patches(folder):
    """In a cross-attention layer the heatmap is the mean cross-attention pattern from the
    last position to tile 0's patches, in the map's grid order; a self-attention layer, which
    never sees the image, is refused instead of drawing the one image token."""
    from mmlens.plotting import image_attention

    model = HookedMultimodalTransformer.from_pretrained(str(folder))
    batch = model.prepare(Image.new("RGB", (37, 29), "red"), "What color is the square?",
                          boxes=[[(2, 2, 20, 20)]])
    _, cache = model.run_with_cache(batch)
    layer = model.cfg.text.cross_attention_layers[0]
    figure = image_attention(cache, batch, layer=layer)
    rows, cols, cells = batch.token_maps[0][0].grid_cells(0)
    pattern = cache[f"blocks.{layer}.cross_attn.hook_pattern"][0].mean(0)
    expected = pattern[-1][torch.tensor(cells)].reshape(rows, cols)
    heat = [trace for trace in figure.data if trace.type == "heatmap"][0]
    assert torch.allclose(torch.tensor(heat.z, dtype=torch.float32), expected, atol=1e-6)
    self_layer = next(i for i in range(model.cfg.n_layers)
                      if i not in model.cfg.text.cross_attention_layers)
    with pytest.raises(KeyError, match="not a cross-attention layer"):
        image_attention(cache, batch, layer=self_layer)


def test_answer_flow_refuses_a_model_whose_image_is_not_in_the_prompt(folder):
    from mmlens.methods.answer_flow import answer_flow

    model = HookedMultimodalTransformer.from_pretrained(str(folder))
    batch = model.prepare(Image.new("RGB", (37, 29), "red"), "What color is the square?")
    with pytest.raises(MMLensError, match="image is not in the prompt"):
        answer_flow(model, batch, answers=["red"])
