"""Edge attribution of cross-attention edges (image keys -> text) on a tiny random
Llama-3.2-Vision in float64, left-padded, two tilings: as for self-attention edges, the linear
estimate of a key span is the derivative (autograd through an edit written here) of a shift of
its keys' logits; a row that loses every key (``"image"``) is scaled by ``1 - a`` to zero
output, its linear term the derivative of that scaling; AtP* the one along the recomputed
pattern; GradDrop the sum of those with each layer's gradient cut; integrated gradients sum to
the exact knockout ``block_attention(..., model=)`` gives, per layer and per head. Text flows
are self-attention edges, image flows cross-attention ones: each scores 0 in layers of the
other kind."""

import dataclasses

import pytest
import torch
from PIL import Image

from mmlens import HookedMultimodalTransformer
from mmlens.core.errors import MMLensError
from mmlens.methods.cross_knockout import image_keys
from mmlens.methods.edge_attribution import edge_attribution
from mmlens.methods.knockout import block_attention
from mmlens.zoo.tiny import tiny_hf_model, tiny_processor

CROSS = (1, 2)


@pytest.fixture(scope="module")
def run():
    hf = tiny_hf_model("mllama")
    model = HookedMultimodalTransformer.from_hf_model(hf, tiny_processor("mllama", hf.config))
    model = model.to(torch.float64)
    assert model.cfg.text.cross_attention_layers == CROSS
    images = [Image.new("RGB", (37, 29), "red"), Image.new("RGB", (13, 30), "blue")]
    batch = model.prepare(images, ["What color is the square?", "Which shape?"],
                          boxes=[[(4, 4, 12, 10)], [(2, 10, 6, 8)]])
    batch = dataclasses.replace(batch, pixel_values=batch.pixel_values.double())
    assert (batch.attention_mask == 0).any()
    with torch.no_grad():
        logits = model(batch)[:, -1]
    answer, wrong = logits.argmax(-1), logits.argmin(-1)

    def metric(out):
        last = out[:, -1]
        return (last.gather(-1, answer[:, None]) - last.gather(-1, wrong[:, None])).mean()

    return model, batch, metric


def value(model, batch, metric, hooks=()) -> float:
    with torch.no_grad():
        return float(metric(model.run_with_hooks(batch, fwd_hooks=list(hooks))))


def edges_of(model, batch, flow):
    """``[batch, 1, text, keys]``: the flow's (target, key) edges, True = blocked."""
    source, target = flow.split("->")
    _, cache = model.run_with_cache(batch, names_filter="blocks.1.cross_attn.hook_mask".__eq__)
    mask = cache["blocks.1.cross_attn.hook_mask"]
    keys = image_keys(source, batch)
    blocked = torch.zeros_like(mask)
    for i, rows in enumerate(batch.span(target)):
        blocked[i, 0, rows[:, None], slice(None) if keys is None else keys[i][None, :]] = True
    return blocked & mask


def derivative(model, batch, metric, name, edit, extra=()) -> float:
    """``d metric / d t`` at ``t = 0`` of the run with ``edit(activation, t)`` at ``name`` (and
    the ``extra`` hooks), by autograd through that edit alone (finite differences would see the
    model's float32 softmax)."""
    t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        hooks = [(name, lambda a, hook: edit(a, t)), *extra]
        out = metric(model.run_with_hooks(batch, fwd_hooks=hooks))
        return float(torch.autograd.grad(out, t)[0])


@pytest.mark.parametrize("layer", CROSS)
def test_linear_estimate_of_a_key_span_is_the_mask_logit_derivative(run, layer):
    model, batch, metric = run
    flow = "related->last"
    frame = edge_attribution(model, batch, metric, flows=[flow], layers=[layer], heads=True)
    edges = edges_of(model, batch, flow)
    # the keys' logits shifted by t, written on the float64 pattern (the model's softmax is
    # float32): p * exp(t) at the blocked keys, renormalised
    name = f"blocks.{layer}.cross_attn.hook_pattern"
    for head in range(model.cfg.n_heads):
        def shift(pattern, t, head=head):
            shifted = pattern.clone()
            shifted[:, head] = torch.where(edges[:, 0], pattern[:, head] * torch.exp(t),
                                           pattern[:, head])
            return shifted / shifted.sum(-1, keepdim=True).clamp_min(1e-300)

        expected = -derivative(model, batch, metric, name, shift)
        got = frame[frame["head"] == head]["score"].item()
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-12)


def test_a_row_losing_every_key_is_scaled_down_linearly(run):
    """``"image"`` leaves the last position no key: the linear term is the derivative of its
    pattern times ``1 - t``, and AtP* (whose recomputed row is zero) gives the same."""
    model, batch, metric = run
    flow, layer = "image->last", 2
    score = edge_attribution(model, batch, metric, flows=[flow], layers=[layer])["score"].item()
    edges = edges_of(model, batch, flow)

    def scale(pattern, t):
        return torch.where(edges, pattern * (1 + t), pattern)

    expected = -derivative(model, batch, metric, f"blocks.{layer}.cross_attn.hook_pattern",
                           scale)
    assert abs(expected) > 1e-4
    assert score == pytest.approx(expected, rel=1e-5)
    assert edge_attribution(model, batch, metric, flows=[flow], layers=[layer],
                            method="atp*")["score"].item() == pytest.approx(score, rel=1e-9)


def test_graddrop_sums_the_estimates_with_each_layers_gradient_cut(run):
    """``image->last`` in layer 2 of 4: cutting layer 0 or 1 (below) changes nothing, cutting
    layer 2 itself leaves no path, cutting layer 3 is computed here by hand."""
    model, batch, metric = run
    flow, layer = "image->last", 2
    plain = edge_attribution(model, batch, metric, flows=[flow], layers=[layer])["score"].item()
    dropped = edge_attribution(model, batch, metric, flows=[flow], layers=[layer],
                               graddrop=True)["score"].item()
    edges = edges_of(model, batch, flow)
    cut = [(f"blocks.3.hook_{part}_out", lambda a, hook: a.detach()) for part in ("attn", "mlp")]
    above = -derivative(model, batch, metric, f"blocks.{layer}.cross_attn.hook_pattern",
                        lambda p, t: torch.where(edges, p * (1 + t), p), cut)
    assert abs(above) > 1e-6 and abs(above - plain) > 1e-6
    assert dropped == pytest.approx((2 * abs(plain) + abs(above)) / 3, rel=1e-5)


def test_atp_star_of_a_key_span_is_the_derivative_along_the_recomputed_pattern(run):
    model, batch, metric = run
    flow, layer = "related->last", 2
    score = edge_attribution(model, batch, metric, flows=[flow], layers=[layer],
                             method="atp*")["score"].item()
    edges = edges_of(model, batch, flow)

    def towards_knockout(pattern, t):
        knocked = pattern.masked_fill(edges, 0)
        knocked = knocked / knocked.sum(-1, keepdim=True)
        return torch.where(edges.any(-1, keepdim=True), pattern + t * (knocked - pattern),
                           pattern)

    expected = derivative(model, batch, metric, f"blocks.{layer}.cross_attn.hook_pattern",
                          towards_knockout)
    assert score == pytest.approx(expected, rel=1e-5)
    assert score != pytest.approx(edge_attribution(
        model, batch, metric, flows=[flow], layers=[layer])["score"].item(), rel=1e-3)


def test_integrated_gradients_sum_to_the_exact_knockout_in_every_layer(run):
    """One call, image and text flows over every layer: each group on its own path reaches
    its own knockout; a flow scores 0 in layers of the other kind."""
    model, batch, metric = run
    clean = value(model, batch, metric)
    flows = ["image->question", "related->last", "question->last"]
    frame = edge_attribution(model, batch, metric, flows=flows, method="ig", steps=32)
    for row in frame.itertuples():
        source, target = row.flow.split("->")
        exact = value(model, batch, metric, block_attention(
            source, target, [row.layer], batch=batch, model=model)) - clean
        assert row.score == pytest.approx(exact, abs=1e-6), (row.flow, row.layer)
        image_flow = source != "question"
        assert (row.score != 0) == (image_flow == (row.layer in CROSS)), (row.flow, row.layer)


@pytest.mark.parametrize("head", [0, 3])
def test_cross_attention_heads_map_to_block_attention_heads(run, head):
    model, batch, metric = run
    clean = value(model, batch, metric)
    exact = value(model, batch, metric, block_attention(
        "image", "last", [2], batch=batch, heads=[head], model=model)) - clean
    frame = edge_attribution(model, batch, metric, flows=["image->last"], layers=[2],
                             heads=[head], method="ig", steps=32)
    assert abs(exact) > 1e-5
    assert frame["score"].item() == pytest.approx(exact, abs=1e-6)


def test_per_head_scores_add_up_to_the_layer(run):
    model, batch, metric = run
    flows = ["image->question", "related->last"]
    by_head = edge_attribution(model, batch, metric, flows=flows, heads=True, method="atp*")
    by_layer = edge_attribution(model, batch, metric, flows=flows, method="atp*")
    summed = by_head.groupby(["flow", "layer"], sort=False)["score"].sum().to_numpy()
    assert summed == pytest.approx(by_layer["score"].to_numpy(), rel=1e-5, abs=1e-12)


def test_bad_flows_are_refused(run):
    model, batch, metric = run
    with pytest.raises(ValueError, match="share edges"):
        edge_attribution(model, batch, metric, flows=["image->last", "related->last"])
    with pytest.raises(MMLensError, match="cross-attention keys"):  # a key span has no queries
        edge_attribution(model, batch, metric, flows=["question->related"])
