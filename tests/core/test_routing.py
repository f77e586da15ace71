"""modrt.routing (numpy) against a naive per-row loop, and against its torch twin."""

from __future__ import annotations

import numpy as np
import pytest

from modrt import routing


def naive(a: np.ndarray, y_of: dict[tuple[int, int], np.ndarray], modules: int, rule: str):
    """Row by row: the distinct modules of each row, their outputs summed or averaged."""
    B = a.shape[0]
    rows_of = {m: [b for b in range(B) if m in set(a[b].tolist())] for m in range(modules)}
    D = next(iter(y_of.values())).shape[0]
    out = np.zeros((B, D))
    for b in range(B):
        mods = sorted(set(a[b].tolist()))
        for m in mods:
            out[b] += y_of[b, m]
        if rule == "mean":
            out[b] /= len(mods)
    return rows_of, out


CASES = [(1, 1, 4), (1, 3, 4), (7, 1, 5), (7, 2, 3), (16, 3, 15), (64, 1, 16), (33, 4, 4), (5, 3, 40)]


@pytest.mark.parametrize("B,K,M", CASES)
@pytest.mark.parametrize("rule", ["sum", "mean"])
def test_dispatch_and_combine_equal_naive_loop(B, K, M, rule):
    rng = np.random.default_rng(B * 100 + K * 10 + M)
    a = rng.integers(0, M, (B, K))
    if B > 2:
        a[0] = a[0, 0]  # a row drawing one module in every slot
    D = 3
    y_of = {(b, m): rng.standard_normal(D) for b in range(B) for m in range(M)}
    rows_of, want = naive(a, y_of, M, rule)

    d = routing.dispatch(a, M)
    assert d.offsets[0] == 0 and d.offsets[-1] == d.rows.shape[0]
    for m in range(M):  # module m serves exactly its rows, in batch order
        assert d.rows[d.offsets[m]:d.offsets[m + 1]].tolist() == rows_of[m]
    assert d.distinct.tolist() == [len(set(r.tolist())) for r in a]
    # The routed block as the runtime fills it: module m's outputs for its rows.
    y = np.stack([y_of[int(b), m] for m in range(M) for b in d.rows[d.offsets[m]:d.offsets[m + 1]]])
    got = routing.combine(y.astype(np.float64), d, B, rule)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # With a pad row supplied (what the runtime passes) the answer is the same.
    padded = np.concatenate([y, np.full((1, D), 7.0)])
    np.testing.assert_allclose(routing.combine(padded, d, B, rule), want, rtol=1e-12, atol=1e-12)


def test_combine_writes_into_out_and_rejects_unknown_rule():
    a = np.array([[0], [1], [0]])
    d = routing.dispatch(a, 2)
    y = np.arange(6, dtype=np.float32).reshape(3, 2)
    out = np.empty((3, 2), np.float32)
    assert routing.combine(y, d, 3, "sum", out=out) is out
    with pytest.raises(ValueError, match="combine rule 'max' unknown"):
        routing.combine(y, d, 3, "max")


def test_greedy_is_argmax_per_slot_first_on_ties():
    lp = np.log(np.array([[[0.2, 0.5, 0.3], [0.4, 0.4, 0.2]]]))
    assert routing.greedy(lp).tolist() == [[1, 0]]
    assert routing.greedy(lp).dtype == np.int64


def test_one_hot_counts():
    assert routing.one_hot_counts(np.array([[0, 2], [2, 2]]), 4).tolist() == [1, 0, 3, 0]


@pytest.mark.parametrize("B,K,M", CASES)
def test_numpy_twin_equals_torch_routing(B, K, M):
    torch = pytest.importorskip("torch")
    troute = pytest.importorskip("modrt.train.routing")
    rng = np.random.default_rng(0)
    a = rng.integers(0, M, (B, K))
    d, td = routing.dispatch(a, M), troute.dispatch(torch.from_numpy(a), M)
    assert d.rows.tolist() == td.rows.tolist()
    assert list(d.offsets) == list(td.offsets)
    assert d.distinct.tolist() == td.distinct.tolist()
    y = rng.standard_normal((d.rows.shape[0], 4)).astype(np.float32)
    for rule in ("sum", "mean"):
        want = troute.combine(torch.from_numpy(y), td, B, rule).numpy()
        np.testing.assert_allclose(routing.combine(y, d, B, rule), want, rtol=1e-6, atol=1e-6)
    lp = rng.standard_normal((B, K, M)).astype(np.float32)
    assert routing.greedy(lp).tolist() == troute.greedy(torch.from_numpy(lp)).tolist()


TOPK_CASES = [(1, 1, 4), (7, 2, 5), (16, 4, 15), (64, 1, 16), (33, 4, 4)]


@pytest.mark.parametrize("B,K,M", TOPK_CASES)
def test_top_k_and_gate_combine_equal_naive_loop(B, K, M):
    rng = np.random.default_rng(B + K + M)
    logits = rng.standard_normal((B, 1, M))
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))  # log-softmax
    a = routing.top_k(lp, K)
    assert a.shape == (B, K) and a.dtype == np.int64
    for b in range(B):  # the K most probable, most probable first, all distinct
        assert a[b].tolist() == sorted(range(M), key=lambda m: -lp[b, 0, m])[:K]
    w = routing.gates(lp, a)
    np.testing.assert_allclose(w.sum(1), 1.0)
    D = 3
    y_of = {(b, m): rng.standard_normal(D) for b in range(B) for m in range(M)}
    want = np.zeros((B, D))
    for b in range(B):  # renormalised probabilities of the selected modules
        p = np.exp(lp[b, 0, a[b]])
        for j, m in enumerate(a[b]):
            want[b] += p[j] / p.sum() * y_of[b, int(m)]
    d = routing.dispatch(a, M)
    y = np.stack([y_of[int(b), m] for m in range(M) for b in d.rows[d.offsets[m]:d.offsets[m + 1]]])
    np.testing.assert_allclose(routing.combine(y, d, B, "gate", weights=w), want, rtol=1e-12, atol=1e-12)


def test_top_k_breaks_ties_towards_the_lower_id_like_onnx_topk():
    lp = np.log(np.full((2, 1, 4), 0.25))
    lp[1, 0, 2] = np.log(0.4)
    assert routing.top_k(lp, 2).tolist() == [[0, 1], [2, 0]]
    assert routing.select(lp, 1, "topk").tolist() == [[0], [2]]
    assert routing.select(np.repeat(lp, 2, axis=1), 2, "slots").tolist() == [[0, 0], [2, 2]]
