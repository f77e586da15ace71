"""REINFORCE and noisy top-k (modrt.train.baselines, ModularGRU.gate) on problems with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from modrt.train import model as lm
from modrt.train.methods import noisy_topk, reinforce
from modrt.train.trainer import Trainer


def _exact_and_sampled_gradients(baseline: float, n: int, batches: int, seed: int = 0, offset: float = 1.0):
    """A controller of two independent steps over M=3 modules (logits theta (2, 3)) and a
    fixed reward table R[a1, a2]. Exact: grad of sum_a p(a) R(a) by enumeration. Sampled:
    the gradient of ``reinforce_surrogate`` (negated) on n draws, ``batches`` times."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(2, 3, generator=gen).requires_grad_()
    R = torch.randn(3, 3, generator=gen) * 2 + offset
    lp = torch.log_softmax(theta, -1)
    expected = (lp[0].exp()[:, None] * lp[1].exp()[None, :] * R).sum()
    (exact,) = torch.autograd.grad(expected, theta)
    grads = []
    for _ in range(batches):
        lp = torch.log_softmax(theta, -1)
        a = torch.multinomial(lp.exp(), n, replacement=True, generator=gen)  # (2, n)
        log_pa = lp[0, a[0]] + lp[1, a[1]]  # (n,)
        (g,) = torch.autograd.grad(reinforce.reinforce_surrogate(log_pa, R[a[0], a[1]], baseline), theta)
        grads.append(-g)  # the surrogate is minimised: its gradient is minus the ascent direction
    return exact, torch.stack(grads)


@pytest.mark.parametrize("baseline", [0.0, 1.0, -3.0])
def test_reinforce_estimator_is_unbiased(baseline):
    exact, grads = _exact_and_sampled_gradients(baseline, n=20_000, batches=25)
    mean = grads.mean(0)
    stderr = grads.std(0) / math.sqrt(grads.shape[0])
    assert (mean - exact).abs().max() < 4 * stderr.max() + 1e-4, (mean, exact, stderr)
    assert exact.abs().max() > 10 * stderr.max()  # the test can tell a wrong gradient apart


def test_a_baseline_near_the_mean_reward_lowers_the_variance():
    # Rewards around 5 (as log-likelihoods sit far from 0): without a baseline every draw
    # pushes its own probability up or down by ~5; a baseline near E[R] removes that.
    _, with_none = _exact_and_sampled_gradients(0.0, n=200, batches=400, seed=1, offset=5.0)
    _, with_mean = _exact_and_sampled_gradients(5.0, n=200, batches=400, seed=1, offset=5.0)
    assert with_mean.var(0).sum() < 0.5 * with_none.var(0).sum()


def test_moving_average_baseline():
    b = reinforce.MovingAverage(0.9)
    assert b.value is None
    b.update(-5.0)
    assert b.value == -5.0
    b.update(-4.0)
    assert b.value == pytest.approx(-4.9)


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_load_loss_matches_a_hand_computed_case():
    # Two rows, three modules, k=1, noise std 1 everywhere. Row 0: noisy top-1 is module 0
    # (1.5); its threshold is the 2nd largest noisy logit (0.2), the others' is 1.5.
    clean = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    noisy = torch.tensor([[1.5, 0.2, -0.1], [0.1, 1.0, 0.3]])
    std = torch.ones(2, 3)
    top = noisy.sort(dim=1, descending=True).values[:, :2]
    p = lm.prob_in_top_k(clean, noisy, std, top, k=1)
    want = torch.tensor([[_phi(1.0 - 0.2), _phi(0.0 - 1.5), _phi(0.0 - 1.5)],
                         [_phi(0.0 - 1.0), _phi(2.0 - 0.3), _phi(0.0 - 1.0)]])
    torch.testing.assert_close(p, want)
    load = p.sum(0)  # [0.9468, 1.0222, 0.2255]
    mean = sum(load.tolist()) / 3
    cv2 = sum((x - mean) ** 2 for x in load.tolist()) / 3 / mean**2
    assert noisy_topk.cv_squared(load).item() == pytest.approx(cv2, rel=1e-5)
    assert cv2 == pytest.approx(0.2410, abs=1e-3)  # by hand: mean 0.7315, variance 0.1290
    importance = torch.tensor([1.0, 1.0, 0.0])
    loss = noisy_topk.balance_loss(importance, load, 0.1, 0.1)
    assert loss.item() == pytest.approx(0.1 * 0.5 + 0.1 * cv2, rel=1e-5)  # CV(1,1,0)^2 = (2/9)/(4/9)


def test_noisy_gate_keeps_k_modules_and_its_weights_sum_to_one(tiny_model_config):
    cfg = tiny_model_config(modules=5, k=2, method="noisy-topk", combine="gate")
    layer = lm.ModularGRU(cfg)
    torch.nn.init.normal_(layer.controller.weight)
    e, h = torch.randn(7, 8), torch.randn(7, 16)
    layer.train()
    a, w, lp, p_in = layer.gate(e, h)
    assert a.shape == (7, 2) and lp.shape == (7, 1, 5) and p_in.shape == (7, 5)
    assert ((w > 0).sum(1) == 2).all()
    torch.testing.assert_close(w.sum(1), torch.ones(7))
    assert torch.equal(w.gather(1, a) > 0, torch.ones(7, 2, dtype=torch.bool))
    layer.eval()  # no noise: the k most probable, weighted by their renormalised probabilities
    a, w, lp, p_in = layer.gate(e, h)
    assert p_in is None
    assert torch.equal(a, lp[:, 0].topk(2).indices)
    p = lp[:, 0].exp()
    torch.testing.assert_close(w.gather(1, a), p.gather(1, a) / p.gather(1, a).sum(1, keepdim=True))


def test_only_selected_modules_and_the_gates_get_gradient(tiny_model_config):
    cfg = tiny_model_config(modules=5, k=2, method="noisy-topk", combine="gate")
    model = lm.ModularLM(cfg)
    model.eval()
    torch.nn.init.normal_(model.layer.controller.weight)
    x = torch.randint(0, 10, (1, 3))
    out = model(x, model.init_hidden(3))
    model.head(out.hs).sum().backward()
    used = set(out.a.flatten().tolist())
    for m, cell in enumerate(model.layer.cells):
        assert (cell.weight_ih.grad is not None) == (m in used), m
    assert model.layer.controller.weight.grad.abs().sum() > 0  # k=2: gates carry gradient


@pytest.mark.parametrize("method", ["reinforce", "noisy-topk"])
def test_baselines_learn_a_repetitive_corpus(tmp_path, tiny_corpus, tiny_model_config, tiny_train_config, method):
    extra = {"k": 2, "combine": "gate"} if method == "noisy-topk" else {}
    mcfg = tiny_model_config(vocab_size=10, dropout=0.0, method=method, **extra)
    trainer = Trainer(mcfg, tiny_train_config(steps=30, lr=3e-2), tiny_corpus(vocab=10, train=2000),
                      tmp_path / "run", progress=False)
    summary = trainer.fit()
    assert summary["valid_ppl"] < 5  # uniform over the 10 words: 10
    assert "memory" not in trainer.method.state()  # no a* memory outside EM
