"""Edge attribution against independent computations on a tiny grouped-query LLaVA (4 heads,
2 key/value heads) in float64 (the model takes the softmax in float32, so the finite
differences step by 1e-2 and agree to 1e-3): the linear estimate is a finite difference of
the blocked edges' mask-logits through ``hook_attn_scores``; AtP* one along the pattern path
written here by hand; integrated gradients sum to the exact knockout that ``block_attention``
(the mask, the fast attention kernel) gives, head by head."""

import dataclasses

import pytest
import torch
from conftest_interventions import tiny_batch, tiny_pair

from mmlens.methods.edge_attribution import edge_attribution
from mmlens.methods.edges import blocked_edges
from mmlens.methods.knockout import block_attention


@pytest.fixture(scope="module")
def run():
    hf, model = tiny_pair(image_size=16)
    model = model.to(torch.float64)
    batch = tiny_batch(hf.config, batch=2, pad=[0, 1], seed=3)
    batch = dataclasses.replace(batch, pixel_values=batch.pixel_values.double())
    with torch.no_grad():
        logits = model(batch)[:, -1]
    answer, wrong = logits.argmax(-1), logits.argmin(-1)

    def metric(out):  # logit_diff_metric in float64 (it computes in float32)
        last = out[:, -1]
        return (last.gather(-1, answer[:, None]) - last.gather(-1, wrong[:, None])).mean()

    return model, batch, metric


def value(model, batch, metric, hooks=()) -> float:
    with torch.no_grad():
        return float(metric(model.run_with_hooks(batch, fwd_hooks=list(hooks))))


def edges_of(batch, flow):
    source, target = flow.split("->")
    n = batch.input_ids.shape[1]
    return blocked_edges(batch.span(source), batch.span(target), n, n)[:, None]


@pytest.mark.parametrize("flow", ["image->question", "question->last"])
def test_linear_estimate_is_the_mask_logit_derivative(run, flow):
    model, batch, metric = run
    layer, eps = 1, 1e-1  # large enough that float32 rounding in the softmax stays small
    frame = edge_attribution(model, batch, metric, flows=[flow], layers=[layer], heads=True)
    edges = edges_of(batch, flow)
    for head in range(model.cfg.n_heads):
        def shift(scores, hook, t=0.0, head=head):
            scores = scores.clone()
            scores[:, head] = scores[:, head] + t * edges[:, 0]
            return scores

        name = f"blocks.{layer}.attn.hook_attn_scores"

        def central(step, name=name, shift=shift):
            up = value(model, batch, metric, [(name, lambda s, hook: shift(s, hook, step))])
            down = value(model, batch, metric, [(name, lambda s, hook: shift(s, hook, -step))])
            return (up - down) / (2 * step)

        # Richardson's extrapolation cancels the central difference's eps**2 term; the logits
        # of the blocked keys go down
        expected = -(4 * central(eps / 2) - central(eps)) / 3
        got = frame[frame["head"] == head]["score"].item()
        assert got == pytest.approx(expected, rel=1e-3, abs=1e-7)


def test_atp_star_is_the_derivative_along_the_recomputed_pattern(run):
    model, batch, metric = run
    flow, layer, eps = "image->last", 2, 1e-2
    score = edge_attribution(model, batch, metric, flows=[flow], layers=[layer],
                             method="atp*")["score"].item()
    edges = edges_of(batch, flow)

    def towards_knockout(pattern, hook, t=0.0):
        knocked = pattern.masked_fill(edges, 0)
        knocked = knocked / knocked.sum(-1, keepdim=True)
        rows = edges.any(-1, keepdim=True)
        return torch.where(rows, pattern + t * (knocked - pattern), pattern)

    name = f"blocks.{layer}.attn.hook_pattern"
    up = value(model, batch, metric, [(name, lambda p, hook: towards_knockout(p, hook, eps))])
    down = value(model, batch, metric, [(name, lambda p, hook: towards_knockout(p, hook, -eps))])
    assert score == pytest.approx((up - down) / (2 * eps), rel=1e-3, abs=1e-7)
    assert score != pytest.approx(edge_attribution(
        model, batch, metric, flows=[flow], layers=[layer])["score"].item(), rel=1e-3)


@pytest.mark.parametrize("flow,layer", [("image->question", 0), ("question->last", 2)])
def test_integrated_gradients_sum_to_the_exact_knockout(run, flow, layer):
    model, batch, metric = run
    clean = value(model, batch, metric)
    source, target = flow.split("->")
    exact = value(model, batch, metric, block_attention(source, target, [layer], batch=batch)) \
        - clean
    frame = edge_attribution(model, batch, metric, flows=[flow], layers=[layer], method="ig",
                             steps=64)
    assert abs(exact) > 1e-3  # the check means something
    assert frame["score"].sum() == pytest.approx(exact, abs=1e-3)


@pytest.mark.parametrize("head", [1, 2])
def test_gqa_heads_map_to_block_attention_heads(run, head):
    """Heads 0, 1 share key/value head 0; 2, 3 share 1: each query head blocked on its own."""
    model, batch, metric = run
    clean = value(model, batch, metric)
    exact = value(model, batch, metric, block_attention(
        "image", "question", [1], batch=batch, heads=[head], model=model)) - clean
    frame = edge_attribution(model, batch, metric, flows=["image->question"], layers=[1],
                             heads=[head], method="ig", steps=64)
    assert list(frame["head"]) == [head]
    assert frame["score"].item() == pytest.approx(exact, abs=1e-3)


def test_per_head_scores_add_up_to_the_layer(run):
    model, batch, metric = run
    by_head = edge_attribution(model, batch, metric, heads=True, method="atp*")
    by_layer = edge_attribution(model, batch, metric, method="atp*")
    summed = by_head.groupby(["flow", "layer"], sort=False)["score"].sum().to_numpy()
    assert summed == pytest.approx(by_layer["score"].to_numpy(), rel=1e-5, abs=1e-9)


def test_graddrop_leaves_the_last_layer_at_its_magnitude(run):
    """Cutting the gradient through a layer below the last changes nothing there, cutting
    the last layer's own output zeroes it: sum_d |est_d| / (L - 1) = |est|."""
    model, batch, metric = run
    last = model.cfg.n_layers - 1
    plain = edge_attribution(model, batch, metric, layers=[last], method="atp*")
    dropped = edge_attribution(model, batch, metric, layers=[last], method="atp*", graddrop=True)
    assert dropped["score"].to_numpy() == pytest.approx(plain["score"].abs().to_numpy(),
                                                        rel=1e-9)
    lower = edge_attribution(model, batch, metric, layers=[0], graddrop=True)
    assert (lower["score"] >= 0).all()


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "exact"}, "method 'exact' is not known"),
    ({"method": "ig", "graddrop": True}, "graddrop applies"),
    ({"flows": ["image->question", "image->question"]}, "share edges"),
    ({"flows": ["image->answer"]}, "no span 'answer'"),
    ({"flows": ["image"]}, "cannot read flow"),
    ({"heads": [4]}, "not distinct heads"),
    ({"layers": [3]}, "not layers of this model"),
    ({"method": "ig", "steps": 0}, "steps and batch_size must be at least 1"),
    ({"flows": ["bos->bos"]}, "would attend to nothing"),
])
def test_bad_input_is_refused(run, kwargs, message):
    model, batch, metric = run
    with pytest.raises(ValueError, match=message):
        edge_attribution(model, batch, metric, **kwargs)


def test_integrated_gradients_put_each_group_on_its_own_path(run):
    """Several flows and layers in one call, stacked in one pass or one group per pass: each
    score is that group's own knockout, not a share of blocking them all."""
    model, batch, metric = run
    clean = value(model, batch, metric)
    flows = ["image->question", "question->last"]
    stacked = edge_attribution(model, batch, metric, flows=flows, layers=[0, 2], method="ig",
                               steps=32, batch_size=64)
    alone = edge_attribution(model, batch, metric, flows=flows, layers=[0, 2], method="ig",
                             steps=32, batch_size=1)
    assert stacked["score"].to_numpy() == pytest.approx(alone["score"].to_numpy(), abs=1e-9)
    for row in stacked.itertuples():
        source, target = row.flow.split("->")
        exact = value(model, batch, metric, block_attention(source, target, [row.layer],
                                                            batch=batch)) - clean
        assert row.score == pytest.approx(exact, abs=3e-3)
