"""modrt.train.routing: dispatch groups rows by distinct module, combine scatters back.

Checked against a naive per-row Python loop on random selections.
"""

from __future__ import annotations

import pytest
import torch

from modrt.train import routing

SHAPES = [(B, M, K) for B in (1, 5, 33) for M in (1, 3, 8) for K in (1, 2, 3) if K <= M]


def naive_dispatch(a: torch.Tensor, modules: int) -> tuple[list[int], list[int], list[int]]:
    """rows, offsets, distinct by looping over modules and rows."""
    sel = [set(row) for row in a.tolist()]
    rows, offsets = [], [0]
    for m in range(modules):
        rows += [b for b, s in enumerate(sel) if m in s]
        offsets.append(len(rows))
    return rows, offsets, [len(s) for s in sel]


def naive_layer(x: torch.Tensor, a: torch.Tensor, weights: torch.Tensor, rule: str) -> torch.Tensor:
    """Each row: combine x_b @ W_m over its distinct selected modules m."""
    out = []
    for b, row in enumerate(a.tolist()):
        mods = sorted(set(row))
        y = sum(x[b] @ weights[m] for m in mods)
        out.append(y / len(mods) if rule == "mean" else y)
    return torch.stack(out)


def routed_layer(x: torch.Tensor, a: torch.Tensor, weights: torch.Tensor,
                 rule: str) -> torch.Tensor:
    """route -> run each module on its rows only -> combine, as ModularGRU.step does."""
    M = weights.shape[0]
    d = routing.dispatch(a, M)
    ys = [x[d.rows[d.offsets[m]:d.offsets[m + 1]]] @ weights[m] for m in range(M)]
    return routing.combine(torch.cat(ys), d, x.shape[0], rule)


def test_hand_made_case():
    a = torch.tensor([[1, 1], [0, 2], [2, 2]])  # (B=3, K=2); module 3 unused
    d = routing.dispatch(a, 4)
    assert d.offsets == [0, 1, 2, 4, 4]
    assert d.rows.tolist() == [1, 0, 1, 2]  # m0: row 1; m1: row 0; m2: rows 1, 2; m3: none
    assert d.distinct.tolist() == [1, 2, 1]
    y = torch.tensor([[10.0], [1.0], [2.0], [4.0]])  # one output per (module, row) pair
    assert routing.combine(y, d, 3, "sum").flatten().tolist() == [1.0, 12.0, 4.0]
    assert routing.combine(y, d, 3, "mean").flatten().tolist() == [1.0, 6.0, 4.0]


def test_module_in_two_slots_counts_once():
    a = torch.tensor([[2, 2, 2]])
    d = routing.dispatch(a, 3)
    assert d.rows.tolist() == [0]
    assert d.offsets == [0, 0, 0, 1]
    assert d.distinct.tolist() == [1]
    y = torch.tensor([[3.0, -1.0]])
    assert torch.equal(routing.combine(y, d, 1, "sum"), y)
    assert torch.equal(routing.combine(y, d, 1, "mean"), y)


@pytest.mark.parametrize("B,M,K", SHAPES)
def test_dispatch_matches_naive(B, M, K):
    g = torch.Generator().manual_seed(B * 100 + M * 10 + K)
    for _ in range(5):
        a = torch.randint(0, M, (B, K), generator=g)
        d = routing.dispatch(a, M)
        rows, offsets, distinct = naive_dispatch(a, M)
        assert d.rows.tolist() == rows
        assert d.offsets == offsets
        assert d.distinct.tolist() == distinct
        assert len(d.offsets) == M + 1 and d.offsets[-1] == len(d.rows)
        assert d.rows.dtype == torch.long


@pytest.mark.parametrize("rule", ["sum", "mean"])
@pytest.mark.parametrize("B,M,K", SHAPES)
def test_combine_matches_naive(B, M, K, rule):
    g = torch.Generator().manual_seed(7 * B + 3 * M + K)
    x = torch.randn(B, 4, generator=g, dtype=torch.float64)
    weights = torch.randn(M, 4, 6, generator=g, dtype=torch.float64)  # one linear map per module
    a = torch.randint(0, M, (B, K), generator=g)
    torch.testing.assert_close(routed_layer(x, a, weights, rule), naive_layer(x, a, weights, rule))


def test_unused_modules_get_empty_groups():
    a = torch.tensor([[0], [5], [0], [5]])
    d = routing.dispatch(a, 8)
    sizes = [d.offsets[m + 1] - d.offsets[m] for m in range(8)]
    assert sizes == [2, 0, 0, 0, 0, 2, 0, 0]


def test_mean_divides_by_distinct_modules():
    a = torch.tensor([[0, 0, 1]])  # two distinct modules in three slots
    d = routing.dispatch(a, 2)
    y = torch.tensor([[2.0], [4.0]])
    assert routing.combine(y, d, 1, "mean").item() == 3.0  # (2 + 4) / 2, not / 3


def test_unknown_rule():
    d = routing.dispatch(torch.tensor([[0]]), 1)
    with pytest.raises(ValueError, match="max"):
        routing.combine(torch.ones(1, 1), d, 1, "max")


def test_greedy_sample_log_prob():
    lp = torch.log_softmax(torch.tensor([[[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]]]), dim=-1)  # (1, 2, 3)
    assert routing.greedy(lp).tolist() == [[1, 0]]
    a = torch.tensor([[2, 0]])
    torch.testing.assert_close(routing.log_prob(lp, a), lp[0, 0, 2:3] + lp[0, 1, 0:1])
    certain = torch.log_softmax(torch.tensor([[[0.0, 100.0, 0.0]]]), dim=-1).expand(50, 1, 3)
    assert (routing.sample(certain, torch.Generator().manual_seed(0)) == 1).all()
