"""modrt.train.em.e_step: candidate 0 is a*, scores are log p(y, a | x), the best is kept."""

from __future__ import annotations

import pytest
import torch

from modrt.train import model as lm
from modrt.train.methods import em

T, B, S, M, V = 4, 6, 5, 4, 12
CERTAIN = 40.0  # controller bias: one module has probability 1 - 3e-18, the others e^-40


@pytest.fixture
def setup(tiny_model_config):
    torch.manual_seed(0)
    model = lm.ModularLM(tiny_model_config(vocab_size=V, modules=M, k=1))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (T, B), generator=g)
    y = torch.randint(0, V, (T, B), generator=g)
    h = torch.randn(B, model.cfg.hidden, generator=g)
    return model, x, y, h


def _make_certain(model: lm.ModularLM, module: int) -> None:
    """A controller that ignores its input and picks ``module`` with probability ~1."""
    ctrl = model.layer.controller
    with torch.no_grad():
        ctrl.weight.zero_()
        ctrl.bias.zero_()
        ctrl.bias[module] = CERTAIN


def _score(model, x, y, h, a):
    """log p(y | x, a) + log p(a | x) per window, computed directly (eval mode). -> (B,)"""
    model.eval()
    with torch.no_grad():
        out = model(x, h, lm.given(a))
        s = (model.token_log_likelihood(out.hs, y) + out.log_pa).sum(0)
    model.train()
    return s


def _check_best_is_argmax(e: em.EStep) -> None:
    pick = e.scores.argmax(0)  # (B,)
    for b in range(e.best.shape[1]):
        assert torch.equal(e.best[:, b], e.candidates[pick[b], :, b])


def test_stored_a_star_is_candidate_zero(setup):
    model, x, y, h = setup
    g = torch.Generator().manual_seed(2)
    replaced = kept = 0
    for _ in range(3):
        a_star = torch.randint(0, M, (T, B, 1), generator=g)
        e = em.e_step(model, x, y, h, a_star, samples=S, generator=g)
        assert e.candidates.shape == (S, T, B, 1)
        assert e.scores.shape == (S, B)
        assert e.best.shape == (T, B, 1) and e.changed.shape == (B,)
        assert torch.equal(e.candidates[0], a_star)
        torch.testing.assert_close(e.scores[0], _score(model, x, y, h, a_star))
        for s in range(1, S):  # every candidate's score is its own log p(y, a | x)
            torch.testing.assert_close(e.scores[s], _score(model, x, y, h, e.candidates[s]))
        _check_best_is_argmax(e)
        # Monotone under an independent computation: a replaced a* scores strictly higher
        # than the stored one, a kept one is the stored one.
        new, old = _score(model, x, y, h, e.best), _score(model, x, y, h, a_star)
        assert (new[e.changed] > old[e.changed]).all()
        assert torch.equal(e.best[:, ~e.changed], a_star[:, ~e.changed])
        assert torch.equal(e.changed, (e.best != a_star).any(2).any(0))
        replaced, kept = replaced + int(e.changed.sum()), kept + int((~e.changed).sum())
    assert replaced and kept  # both branches of the checks above were exercised
    assert model.training  # the E-step puts the model back in training mode


def test_best_stored_a_star_is_kept(setup):
    model, x, y, h = setup
    _make_certain(model, 2)
    a_star = torch.full((T, B, 1), 2)
    e = em.e_step(model, x, y, h, a_star, samples=S, generator=torch.Generator().manual_seed(3))
    assert (e.candidates == 2).all()  # the draws all pick the certain module
    assert not e.changed.any()
    assert torch.equal(e.best, a_star)
    _check_best_is_argmax(e)


def test_worse_stored_a_star_is_replaced(setup):
    model, x, y, h = setup
    _make_certain(model, 1)
    a_star = torch.full((T, B, 1), 3)  # log p(a* | x) = -40 per step
    e = em.e_step(model, x, y, h, a_star, samples=S, generator=torch.Generator().manual_seed(4))
    assert (e.candidates[1:] == 1).all()
    assert e.changed.all()
    assert (e.best == 1).all()
    assert (e.scores[e.scores.argmax(0), torch.arange(B)] > e.scores[0]).all()  # strictly: a* lost
    assert (e.scores[0] < -T * CERTAIN / 2).all()
    _check_best_is_argmax(e)
    # The new best scores higher than the stored a* under an independent computation too.
    assert (_score(model, x, y, h, e.best) > _score(model, x, y, h, a_star)).all()


def test_m_step_trains_towards_a_star(setup):
    model, x, y, h = setup
    a_star = torch.randint(0, M, (T, B, 1), generator=torch.Generator().manual_seed(5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.eval()  # no dropout: the objective is deterministic
    first = em.m_step_loss(model, x, y, h, a_star)
    assert torch.equal(first.out.a, a_star)
    torch.testing.assert_close(first.total, first.nll + first.aux["controller"])
    for _ in range(20):
        m = em.m_step_loss(model, x, y, h, a_star)
        opt.zero_grad()
        m.total.backward()
        opt.step()
    last = em.m_step_loss(model, x, y, h, a_star)
    assert last.nll < first.nll
    assert last.aux["controller"] < first.aux["controller"]


@pytest.mark.parametrize("windows", [415, 400, 7, 1])
@pytest.mark.parametrize("every", [1, 2, 3, 10])
def test_every_window_gets_its_e_step(windows, every):
    """Across ``every`` consecutive epochs each window is E-stepped exactly once, and each epoch
    E-steps about 1/every of its windows - whatever the number of windows per epoch. (PTB has
    415 windows: keyed on the global step, every=10 only ever reached windows 0 and 5 mod 10.)"""
    for first in (0, 3):
        hits = torch.zeros(windows, dtype=torch.long)
        for epoch in range(first, first + every):
            due = torch.tensor([em.e_step_due(w, epoch, every) for w in range(windows)])
            assert abs(int(due.sum()) - windows / every) <= 1
            hits += due.long()
        assert (hits == 1).all()


def test_prior_weight_scales_the_controller_term(setup):
    """score = log p(y|x,a) + w log p(a|x): checked against the candidates' direct scores."""
    model, x, y, h = setup
    _make_certain(model, 1)
    a_star = torch.full((T, B, 1), 3)  # log p(a* | x) = -40 per step
    runs = {w: em.e_step(model, x, y, h, a_star, samples=S, generator=torch.Generator().manual_seed(6),
                         prior_weight=w) for w in (0.0, 0.5, 1.0)}
    for w in (0.5, 1.0):  # same draws whatever the weight
        assert torch.equal(runs[w].candidates, runs[0.0].candidates)
    for s in range(S):
        joint = _score(model, x, y, h, runs[1.0].candidates[s])
        torch.testing.assert_close(runs[1.0].scores[s], joint, rtol=1e-5, atol=1e-4)
    model.eval()
    with torch.no_grad():
        ll = torch.stack([model.token_log_likelihood(model(x, h, lm.given(c)).hs, y).sum(0)
                          for c in runs[0.0].candidates])
    model.train()
    torch.testing.assert_close(runs[0.0].scores, ll, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(runs[0.5].scores, (runs[0.0].scores + runs[1.0].scores) / 2, rtol=1e-5, atol=1e-4)
    # Under the joint the stored a* (prior e^-40 per step) always loses; by likelihood alone it
    # wins exactly where its likelihood is the highest.
    assert (runs[1.0].scores[0] < -T * CERTAIN / 2).all()
    assert torch.equal(runs[0.0].best, runs[0.0].candidates[ll.argmax(0), :, torch.arange(B)].permute(1, 0, 2))


def test_bfloat16_scores_rank_like_float32(setup):
    """--e-step-dtype bfloat16: the head's matmul in bfloat16, the same candidates, scores
    within a few hundredths of a nat of float32's; a clearly better candidate still wins."""
    model, x, y, h = setup
    with torch.no_grad():  # modules far apart, so that candidates' scores differ clearly
        for m, cell in enumerate(model.layer.cells):
            for p in cell.parameters():
                p.mul_(1 + 3 * m)
    a_star = torch.randint(0, M, (T, B, 1), generator=torch.Generator().manual_seed(7))
    runs = {d: em.e_step(model, x, y, h, a_star, samples=S, generator=torch.Generator().manual_seed(8),
                         prior_weight=0.0, dtype=d) for d in (None, torch.float32, torch.bfloat16)}
    assert torch.equal(runs[torch.float32].scores, runs[None].scores)  # float32: the model's own path
    assert torch.equal(runs[torch.bfloat16].candidates, runs[None].candidates)
    assert not torch.equal(runs[torch.bfloat16].scores, runs[None].scores)  # it did run in bfloat16
    torch.testing.assert_close(runs[torch.bfloat16].scores, runs[None].scores, rtol=0, atol=0.1)
    exact = runs[None].scores
    top2 = exact.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 0.2  # windows whose best candidate leads by > 0.2 nats
    assert clear.any()
    assert torch.equal(runs[torch.bfloat16].scores.argmax(0)[clear], exact.argmax(0)[clear])
