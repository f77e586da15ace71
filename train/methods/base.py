"""The method interface's types (``methods/__init__.py`` draws it): a window in, losses out."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from modrt.train import model as lm
from modrt.train.config import ModelConfig, TrainConfig


class Window(NamedTuple):
    """One training step's input: window ``index`` of epoch ``epoch`` at global ``step``."""

    x: torch.Tensor  # (T, B) tokens
    y: torch.Tensor  # (T, B) next tokens
    h: torch.Tensor  # (B, H) state entering the window
    index: int
    epoch: int
    step: int


class Losses(NamedTuple):
    nll: torch.Tensor  # scalar: -mean log p(y | x, a) per token (nats)
    aux: dict[str, torch.Tensor]  # named auxiliary losses (controller, balance), minimised too
    out: lm.RecurrentOutput
    info: dict[str, float] = {}  # counters for the log (EM: e_changed, e_total)

    @property
    def total(self) -> torch.Tensor:
        return self.nll + sum(self.aux.values(), self.nll.new_zeros(()))

    @property
    def auxiliary(self) -> torch.Tensor:
        return sum(self.aux.values(), self.nll.new_zeros(()))


class Method:
    """The interface; the base class is also the plain objective -log p(y | x, a) under a
    given policy (None: the model's own, e.g. dense)."""

    name = "base"

    def __init__(self, model: lm.ModularLM, mcfg: ModelConfig, tcfg: TrainConfig, windows: int):
        self.model, self.mcfg, self.tcfg, self.windows = model, mcfg, tcfg, windows

    def losses(self, w: Window) -> Losses:
        raise NotImplementedError

    def after_step(self, w: Window, losses: Losses) -> None:
        """Called after the optimiser step."""

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore ``state()`` from a checkpoint."""


def nll_of(model: lm.ModularLM, out: lm.RecurrentOutput, y: torch.Tensor) -> torch.Tensor:
    """-mean log p(y | ...) per token of a forward pass (with gradient)."""
    return -model.token_log_likelihood(out.hs, y).mean()


def stats(out: lm.RecurrentOutput, modules: int) -> dict[str, torch.Tensor]:
    """Controller entropies (nats) and module usage of one step's forward pass."""
    from modrt.train import routing

    counts = routing.one_hot_counts(out.a, modules)
    if out.log_probs is None:
        zero = torch.zeros(())
        return {"entropy_example": zero, "entropy_batch": zero, "usage": counts}
    ex, batch = routing.entropies(out.log_probs.detach())
    return {"entropy_example": ex, "entropy_batch": batch, "usage": counts}


__all__ = ["Losses", "Method", "Window", "nll_of", "stats"]
