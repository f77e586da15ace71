"""modrt.train.model: a modular layer against plain references, and gradient routing."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from modrt.train import model as lm

T, B = 6, 5


def _copy_cell_into_gru(cell: nn.GRUCell, gru: nn.GRU) -> None:
    with torch.no_grad():
        gru.weight_ih_l0.copy_(cell.weight_ih)
        gru.weight_hh_l0.copy_(cell.weight_hh)
        gru.bias_ih_l0.copy_(cell.bias_ih)
        gru.bias_hh_l0.copy_(cell.bias_hh)


@pytest.mark.parametrize("method,combine", [("em", "sum"), ("em", "mean"), ("dense", "sum")])
def test_one_module_equals_plain_gru(tiny_model_config, method, combine):
    torch.manual_seed(0)
    cfg = tiny_model_config(modules=1, k=1, method=method, combine=combine)
    layer = lm.ModularGRU(cfg).double()
    gru = nn.GRU(cfg.embedding, cfg.hidden).double()
    _copy_cell_into_gru(layer.cells[0], gru)

    e = torch.randn(T, B, cfg.embedding, dtype=torch.float64)
    h0 = torch.randn(B, cfg.hidden, dtype=torch.float64)
    e1, h1 = e.clone().requires_grad_(), h0.clone().requires_grad_()
    e2, h2 = e.clone().requires_grad_(), h0.clone().requires_grad_()
    w = torch.randn(T, B, cfg.hidden, dtype=torch.float64)  # a loss that weighs every output

    policy = lm.given(torch.zeros(T, B, 1, dtype=torch.long)) if cfg.routed else None
    out = layer(e1, h1, policy)
    ref, ref_last = gru(e2, h2.unsqueeze(0))  # (T, B, H), (1, B, H)
    torch.testing.assert_close(out.hs, ref)
    torch.testing.assert_close(out.h_last, ref_last[0])

    (out.hs * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(e1.grad, e2.grad)
    torch.testing.assert_close(h1.grad, h2.grad)
    cell = layer.cells[0]
    for mine, theirs in [(cell.weight_ih, gru.weight_ih_l0), (cell.weight_hh, gru.weight_hh_l0),
                         (cell.bias_ih, gru.bias_ih_l0), (cell.bias_hh, gru.bias_hh_l0)]:
        torch.testing.assert_close(mine.grad, theirs.grad)
    if cfg.routed:  # a single module is picked with probability 1
        assert torch.equal(out.log_pa, torch.zeros(T, B, dtype=torch.float64))


@pytest.mark.parametrize("combine,scale", [("sum", 1.0), ("mean", 1 / 3)])
def test_dense_three_modules_combine_their_cells(tiny_model_config, combine, scale):
    torch.manual_seed(1)
    cfg = tiny_model_config(modules=3, k=3, method="dense", combine=combine)
    layer = lm.ModularGRU(cfg)
    assert layer.controller is None
    e, h = torch.randn(T, B, cfg.embedding), torch.randn(B, cfg.hidden)
    out = layer(e, h)
    ref = h
    for t in range(T):
        ref = scale * sum(cell(e[t], ref) for cell in layer.cells)
        torch.testing.assert_close(out.hs[t], ref)
    assert out.a.tolist() == [[[0, 1, 2]] * B] * T


def test_unused_modules_get_no_gradient(tiny_model_config):
    torch.manual_seed(2)
    cfg = tiny_model_config(modules=8, k=1, vocab_size=12)
    model = lm.ModularLM(cfg)
    used = [0, 3, 6]
    g = torch.Generator().manual_seed(0)
    a = torch.tensor(used)[torch.randint(0, len(used), (T, B, 1), generator=g)]  # (T, B, 1)
    a[0, :, 0] = torch.tensor([0, 3, 6, 0, 3])  # every used module serves some row
    x = torch.randint(0, cfg.vocab_size, (T, B), generator=g)
    y = torch.randint(0, cfg.vocab_size, (T, B), generator=g)
    out = model(x, model.init_hidden(B), lm.given(a))
    assert torch.equal(out.a, a)
    ll = model.token_log_likelihood(out.hs, y)
    (-(ll.mean()) - out.log_pa.mean()).backward()
    for m, cell in enumerate(model.layer.cells):
        grads = [p.grad for p in cell.parameters()]
        if m in used:
            assert all(gr is not None and gr.abs().sum() > 0 for gr in grads), f"module {m}"
        else:
            assert all(gr is None or not gr.any() for gr in grads), f"module {m}"
    assert model.layer.controller.weight.grad.abs().sum() > 0


def test_greedy_policy_picks_the_argmax(tiny_model_config):
    torch.manual_seed(3)
    cfg = tiny_model_config(modules=4, k=2)
    layer = lm.ModularGRU(cfg)
    e, h = torch.randn(T, B, cfg.embedding), torch.zeros(B, cfg.hidden)
    out = layer(e, h, lm.greedy_policy())
    assert out.log_probs.shape == (T, B, 2, 4)
    assert torch.equal(out.a, out.log_probs.argmax(-1))
    torch.testing.assert_close(out.log_pa, out.log_probs.max(-1).values.sum(-1))


def test_token_log_likelihood_is_the_same_in_any_chunking(tiny_model_config, monkeypatch):
    """The default chunking (by CPU_LOGITS_FLOATS) scores what one row per chunk, a ragged
    chunking and the whole window at once score: log_softmax(head(h))[y] per token, with the
    same gradient."""
    torch.manual_seed(4)
    cfg = tiny_model_config(modules=3, k=1, vocab_size=12)
    model = lm.ModularLM(cfg).eval()
    T, B = 7, 5
    x, y = torch.randint(0, 12, (T, B)), torch.randint(0, 12, (T, B))
    with torch.no_grad():
        hs = model(x, model.init_hidden(B), lm.greedy_policy()).hs
        want = torch.log_softmax(model.head(hs), -1).gather(-1, y[..., None])[..., 0]
        for rows in (None, 1, 3, 2 * B, T * B):
            torch.testing.assert_close(model.token_log_likelihood(hs, y, rows), want)
        monkeypatch.setattr(lm, "CPU_LOGITS_FLOATS", 4 * 12)  # four rows per chunk, the last one short
        assert model.head_rows(hs.device) == 4
        torch.testing.assert_close(model.token_log_likelihood(hs, y), want)
    grads = []
    for rows in (4, T * B):
        model.zero_grad()
        model.token_log_likelihood(hs, y, rows).sum().backward()
        grads.append(model.head.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
