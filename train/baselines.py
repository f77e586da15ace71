"""The paper's baselines as training objectives (DESIGN.md §3): REINFORCE and noisy top-k.

REINFORCE (Williams 1992). The controller samples a selection per step; the modules and
the rest of the network train by backprop through that sampled selection, and the
controller by the score-function estimator of the gradient of E_a[R(a)]:

    grad E[R] = E[(R(a) - b) * grad log p(a | x)]

with the reward R = log p(y | x, a) of the window (mean per token) and b a moving average
of past rewards. b does not depend on the current draw, so the estimator stays unbiased;
it only lowers the variance. Nothing else (no entropy bonus) is added.

Noisy top-k (Shazeer et al. 2017): the gating network's noisy top-k (``ModularGRU.gate``)
picks and weights the modules; the loss adds their balance terms,

    w_importance * CV(Importance)^2 + w_load * CV(Load)^2

with Importance the gate mass per module and Load the smooth count of how often each
module is in the top k, over all positions of the batch; CV = std / mean (population std).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from modrt.train import model as lm


class Loss(NamedTuple):
    loss: torch.Tensor  # scalar to minimise
    nll: torch.Tensor  # scalar: -mean log p(y | x, a) per token (nats)
    controller: torch.Tensor  # scalar: the controller's part of ``loss``
    out: lm.RecurrentOutput
    reward: torch.Tensor | None = None  # (B,) REINFORCE rewards (detached)


class MovingAverage:
    """The REINFORCE baseline: b <- decay * b + (1 - decay) * x; None until the first x."""

    def __init__(self, decay: float, value: float | None = None):
        self.decay = decay
        self.value = value

    def update(self, x: float) -> None:
        self.value = x if self.value is None else self.decay * self.value + (1.0 - self.decay) * x


def reinforce_surrogate(log_pa: torch.Tensor, reward: torch.Tensor, baseline: float) -> torch.Tensor:
    """A scalar whose gradient is minus the score-function estimate of grad E[R].

    log_pa (N,): log p(a_n | x_n) of each drawn selection (with gradient);
    reward (N,): R(a_n), no gradient flows through it; baseline: a number independent of
    the draws. Minimising it ascends E[R].
    """
    advantage = (reward - baseline).detach()
    return -(advantage * log_pa).mean()


def reinforce_loss(model: lm.ModularLM, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor,
                   baseline: MovingAverage) -> Loss:
    """One REINFORCE step's objective; the caller updates ``baseline`` with ``reward`` after."""
    out = model(x, h, lm.sample_policy())
    ll = model.token_log_likelihood(out.hs, y)  # (T, B)
    nll = -ll.mean()
    reward = ll.mean(0).detach()  # (B,) mean log-likelihood per token of each window
    if baseline.value is None:  # no past rewards yet: no controller step (keeps it unbiased)
        ctrl = nll.new_zeros(())
    else:
        # Per-token scale: log p(a | x) of the window divided by T, like the reward.
        ctrl = reinforce_surrogate(out.log_pa.mean(0), reward, baseline.value)
    return Loss(nll + ctrl, nll, ctrl, out, reward)


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation of a 1-D tensor: var / mean^2 (0 for one element)."""
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.float().var(unbiased=False) / (x.float().mean() ** 2 + eps)


def balance_loss(importance: torch.Tensor, load: torch.Tensor | None, w_importance: float,
                 w_load: float) -> torch.Tensor:
    """Shazeer et al.'s importance and load losses. (M,), (M,) -> scalar."""
    loss = w_importance * cv_squared(importance)
    if load is not None:
        loss = loss + w_load * cv_squared(load)
    return loss


def noisy_topk_loss(model: lm.ModularLM, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor,
                    w_importance: float, w_load: float) -> Loss:
    out = model(x, h)
    logits = model.logits(out.hs)  # (T, B, V)
    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    load = out.load if model.cfg.k < model.cfg.modules else None
    aux = balance_loss(out.importance, load, w_importance, w_load)
    return Loss(nll + aux, nll, aux, out)


def baseline_state(b: MovingAverage) -> dict[str, Any]:
    return {"decay": b.decay, "value": b.value}
