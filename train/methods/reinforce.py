"""REINFORCE, the paper's first baseline (DESIGN.md §3).

REINFORCE (Williams 1992). The controller samples a selection per step; the modules and
the rest of the network train by backprop through that sampled selection, and the
controller by the score-function estimator of the gradient of E_a[R(a)]:

    grad E[R] = E[(R(a) - b) * grad log p(a | x)]

with the reward R = log p(y | x, a) of the window (mean per token) and b a moving average
of past rewards. b does not depend on the current draw, so the estimator stays unbiased;
it only lowers the variance. Nothing else (no entropy bonus) is added.
"""

from __future__ import annotations

from typing import Any

import torch

from modrt.train import model as lm
from modrt.train.methods.base import Batch, Losses, Method, Window


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
                   baseline: MovingAverage) -> tuple[Losses, torch.Tensor]:
    """``reinforce_of`` one PTB window."""
    return reinforce_of(model, Window(x, y, h, 0, 0, 0), baseline)


def reinforce_of(model, w: Batch, baseline: MovingAverage,
                 keys: torch.Tensor | None = None) -> tuple[Losses, torch.Tensor]:
    """One REINFORCE step's objective and its (B,) rewards (detached); the caller updates
    ``baseline`` with the rewards after the step. ``keys`` (B,): the draws keyed by
    example (``routing.sample_keyed``); None: torch's global generator."""
    out, ll = model.run_scored(w.x, w.h, lm.sample_policy(keys=keys), w.y)  # ll (T, B) per token, or (1, B)
    nll = -ll.mean()
    reward = ll.mean(0).detach()  # (B,) mean log-likelihood per token of each window (or the image's)
    if baseline.value is None:  # no past rewards yet: no controller step (keeps it unbiased)
        ctrl = nll.new_zeros(())
    else:
        # On the reward's scale: log p(a | x) of the whole example, per token of a window
        # (divided by T like the reward); an image's selections over its layers, summed.
        ctrl = reinforce_surrogate(out.log_pa.sum(0) / ll.shape[0], reward, baseline.value)
    return Losses(nll, {"controller": ctrl}, out), reward


class Reinforce(Method):
    """Owns the reward's moving-average baseline (in the checkpoint)."""

    name = "reinforce"

    def __init__(self, model, mcfg, tcfg, examples, positions):
        super().__init__(model, mcfg, tcfg, examples, positions)
        self.baseline = MovingAverage(tcfg.baseline_decay)
        self._reward: torch.Tensor | None = None

    def losses(self, w: Batch) -> Losses:
        losses, self._reward = reinforce_of(self.model, w, self.baseline, self.keys(w, w.step))
        return losses

    def after_step(self, w: Batch, losses: Losses) -> None:
        # The mean reward of the whole batch (over every process's rows).
        total = self.world.sum_(torch.stack([self._reward.double().sum(), self._reward.new_tensor(
            self._reward.numel(), dtype=torch.float64)]))
        self.baseline.update(float(total[0] / total[1]))

    def state(self) -> dict[str, Any]:
        return {"baseline": self.baseline.value}

    def load_state(self, state: dict[str, Any]) -> None:
        self.baseline = MovingAverage(self.tcfg.baseline_decay, state.get("baseline"))


