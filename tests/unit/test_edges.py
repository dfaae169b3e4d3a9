"""The blocked-edge primitive: edges in cache coordinates, positions outside the run skipped,
stranded queries refused; block_attention and the sweep engine build the same edges."""

import pytest
import torch

from mmlens.experiments.engine import _edge_masks
from mmlens.experiments.knockouts import Knockout
from mmlens.methods.edges import blocked_edges, check_attendable
from mmlens.methods.knockout import block_attention


def by_hand(sources, targets, q_len, k_len):
    out = torch.zeros(len(sources), q_len, k_len, dtype=torch.bool)
    for row, (keys, queries) in enumerate(zip(sources, targets, strict=True)):
        for q in queries:
            for k in keys:
                if k_len - q_len <= q < k_len and 0 <= k < k_len:
                    out[row, q - (k_len - q_len), k] = True
    return out


def test_blocked_edges_match_a_hand_loop_with_a_cached_prefix():
    sources = [torch.tensor([0, 2, 9]), torch.tensor([1])]
    targets = [torch.tensor([3, 5, 6]), torch.tensor([7, 2])]  # 2 is in the cache: skipped
    got = blocked_edges(sources, targets, q_len=5, k_len=8)
    assert torch.equal(got, by_hand(sources, targets, 5, 8))
    assert got[0, 0, 0] and got[0, 2, 2] and got.sum() == 3 * 2 + 1
    with pytest.raises(ValueError, match="2 source lists but 1 target lists"):
        blocked_edges(sources, targets[:1], 5, 8)


def test_stranded_query_is_refused_with_its_position():
    allowed = torch.ones(2, 3, 4, 6, dtype=torch.bool)
    check_attendable(allowed, 2, "here")
    allowed[1, 2, 3] = False
    with pytest.raises(ValueError, match="here: position 5 of example 1 \\(head 2\\) would "
                                         "attend to nothing"):
        check_attendable(allowed, 2, "here")


def test_block_attention_and_the_engine_block_the_same_edges():
    source, target = torch.tensor([1, 2, 4]), torch.tensor([5, 6])
    n_keys, position = 7, 5
    engine = _edge_masks([Knockout(source, target, (0,))], position, n_keys)
    (_, hook), = block_attention(source, target, [0])
    causal = torch.arange(n_keys)[None, :] <= torch.arange(position, n_keys)[:, None]
    edited = hook(causal[None, None].clone(), None)
    assert torch.equal(~edited[0, 0] & causal, engine[0])
    with pytest.raises(ValueError, match="knockout sweep: position 5 of knockout 0"):
        _edge_masks([Knockout(torch.arange(6), target, (0,))], position, n_keys)
