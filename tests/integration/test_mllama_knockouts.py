"""Llama-3.2-Vision knockouts against Hugging Face's eager model: a partly blocked row is HF
with the blocked keys added to its own cross-attention mask, a row whose every image key is
blocked gets zero cross-attention output, ``block_attention`` from the image acts in the
window's cross-attention layers only (all heads or chosen ones) and from text in the
self-attention layers only, related spans need boxes, and the sweep's cells are HF's."""

import pytest
import torch
from mllama_pair import (
    CROSS,
    _blocked,
    _cell,
    _close,
    _hf_edit,
    _hf_run,
    _hf_self_edit,
    _images,
    _in_layer,
    _inputs,
    _mask_hooks,
    _ours,
    eager_hf,
    hooked,
    left_padded,
)

from mmlens.core.errors import MMLensError


@pytest.fixture(scope="module")
def hf():
    return eager_hf()


@pytest.fixture(scope="module")
def model(hf):
    return hooked(hf)


@pytest.fixture(scope="module")
def batch(model):
    return left_padded(model)


def test_partly_blocked_rows_are_hf_eager_with_an_edited_cross_attention_mask(hf, model, batch):
    inputs, positions = batch
    last = inputs["input_ids"].shape[1] - 1
    n = model.cfg.vision.n_tokens
    block = _blocked(inputs, model, [(0, last), (1, last), (0, 3)], slice(2, n + 5))
    zero = torch.zeros(block.shape[0], block.shape[2], dtype=torch.bool)
    out, _ = _hf_run(hf, inputs, positions, _hf_edit(block, zero))
    logits, _ = _ours(model, inputs, _mask_hooks(block))
    assert _close(model, inputs, logits, out.logits)
    plain, _ = _ours(model, inputs)
    assert not _close(model, inputs, plain, out.logits)



def test_a_row_with_every_image_key_blocked_gets_zero_cross_attention_output(hf, model, batch):
    inputs, positions = batch
    last = inputs["input_ids"].shape[1] - 1
    block = _blocked(inputs, model, [(0, last), (1, last - 2)], slice(None))
    zero = block.all(-1)[:, 0]
    out, _ = _hf_run(hf, inputs, positions, _hf_edit(block & ~zero[:, None, :, None], zero))
    seen = {}
    hooks = [*_mask_hooks(block), ("blocks.1.hook_attn_out",
                                   lambda a, hook: seen.setdefault("attn", a))]
    logits, _ = _ours(model, inputs, hooks)
    assert torch.equal(seen["attn"][zero], torch.zeros_like(seen["attn"][zero]))
    assert seen["attn"][~zero].abs().max() > 0
    assert _close(model, inputs, logits, out.logits)



def test_block_attention_from_the_image_zeroes_the_cross_attention_of_the_window(
        hf, model, batch):
    from mmlens.methods import block_attention

    inputs, positions = batch
    last = inputs["input_ids"].shape[1] - 1
    hooks = block_attention("image", [last - 1, last], [0, 1], model=model)
    assert [name for name, _ in hooks] == ["blocks.1.cross_attn.hook_mask"]
    zero = torch.zeros(2, last + 1, dtype=torch.bool)
    zero[:, last - 1:] = True

    none = torch.zeros(2, 1, last + 1, 1, dtype=torch.bool)
    out, _ = _hf_run(hf, inputs, positions, _in_layer(1, _hf_edit(none, zero)))
    logits, _ = _ours(model, inputs, hooks)
    assert _close(model, inputs, logits, out.logits)
    plain, _ = _ours(model, inputs)
    assert not _close(model, inputs, plain, out.logits)



def test_block_attention_from_text_edits_only_the_self_attention_layers(hf, model, batch):
    from mmlens.methods import block_attention

    inputs, positions = batch
    last = inputs["input_ids"].shape[1] - 1
    hooks = block_attention([3, 4, 5], last, range(4), model=model)
    assert [name for name, _ in hooks] == ["blocks.0.attn.hook_mask", "blocks.3.attn.hook_mask"]
    block = torch.zeros(2, 1, last + 1, last + 1, dtype=torch.bool)
    block[:, 0, last, 3:6] = True
    handles = [_hf_self_edit(block)(hf.model.language_model.layers[i].self_attn)
               for i in (0, 3)]
    try:
        out, _ = _hf_run(hf, inputs, positions)
    finally:
        for handle in handles:
            handle.remove()
    logits, _ = _ours(model, inputs, hooks)
    assert _close(model, inputs, logits, out.logits)



def test_related_spans_on_the_image_keys_need_a_batch_with_boxes(model):
    from mmlens.methods import block_attention

    with pytest.raises(MMLensError, match="pass batch="):
        block_attention("related", [5], [1], model=model)
    batch = model.prepare(_images()[:1], ["What color is the square?"])
    with pytest.raises(MMLensError, match="boxes="):
        block_attention("related", "last", [1], batch=batch, model=model)



def test_the_sweep_knocks_out_the_image_keys_and_the_self_attention_edges_as_hf(hf, model):
    from mmlens.experiments import information_flow

    images = _images()[:2]
    prepared = model.prepare(images, ["What color is the square?", "Which shape is red?"])
    flows = ["image->question", "image->last", "question->last", "last->last"]
    kwargs = dict(flows=flows, window=1, only_correct=False, progress=False)
    fast = information_flow(model, prepared, **kwargs)
    naive = information_flow(model, prepared, method="naive", **kwargs)
    assert len(fast) == 2 * len(flows) * 4
    assert (fast.p_block - naive.p_block).abs().max() < 1e-6
    # image flows change nothing in self-attention layers; text flows nothing in cross layers
    image_rows = fast.flow.str.startswith("image") & ~fast.layer.isin(CROSS)
    text_rows = ~fast.flow.str.startswith("image") & fast.layer.isin(CROSS)
    untouched = fast[image_rows | text_rows]  # the clean run, up to the engine's rounding
    assert (untouched.p_block - untouched.p_base).abs().max() <= 1e-6
    assert (naive[image_rows | text_rows].rel_change == 0).all()
    for i, (image, example) in enumerate(zip(images, fast.example_id.unique(), strict=True)):
        text = prepared.prompts[i].replace("<image>", "<|image|>")
        inputs = _inputs(model, [[image]], [text])
        ids = prepared.input_ids[i][prepared.attention_mask[i].bool()]
        assert torch.equal(inputs["input_ids"][0], ids)
        last = len(ids) - 1
        question = prepared.span("question")[i] - (prepared.input_ids.shape[1] - len(ids))
        positions = torch.arange(len(ids))[None]
        zero = torch.zeros(1, len(ids), dtype=torch.bool)
        zero[0, last] = True
        none = torch.zeros(1, 1, len(ids), 1, dtype=torch.bool)
        out, _ = _hf_run(hf, inputs, positions, _in_layer(3, _hf_edit(none, zero)))
        row = _cell(fast, example, "image->last", 3)
        token = int(row.answer_token.iloc[0])
        expected = out.logits[0, -1].softmax(-1)[token]
        assert abs(float(row.p_block.iloc[0]) - float(expected)) < 1e-5
        block = torch.zeros(1, 1, len(ids), len(ids), dtype=torch.bool)
        block[0, 0, last, question] = True
        handle = _hf_self_edit(block)(hf.model.language_model.layers[0].self_attn)
        try:
            out, _ = _hf_run(hf, inputs, positions)
        finally:
            handle.remove()
        row = _cell(fast, example, "question->last", 0)
        expected = out.logits[0, -1].softmax(-1)[token]
        assert abs(float(row.p_block.iloc[0]) - float(expected)) < 1e-5



def test_block_attention_from_the_image_in_chosen_heads_zeroes_those_heads(hf, model, batch):
    from mmlens.methods import block_attention

    inputs, positions = batch
    last = inputs["input_ids"].shape[1] - 1
    hooks = block_attention("image", [last], [2], heads=[1, 2], model=model)
    d_head = model.cfg.d_head

    def zero_heads(layer, module):
        def pre(m, args):  # o_proj's input [batch, text, heads * d_head]: heads 1-2 at last
            z = args[0].clone()
            z[:, last, d_head:3 * d_head] = 0
            return (z,)
        return [module.o_proj.register_forward_pre_hook(pre)]

    out, _ = _hf_run(hf, inputs, positions, _in_layer(2, zero_heads))
    logits, _ = _ours(model, inputs, hooks)
    assert _close(model, inputs, logits, out.logits)
    plain, _ = _ours(model, inputs)
    assert not _close(model, inputs, plain, out.logits)
