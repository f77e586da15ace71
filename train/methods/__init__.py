"""Training methods behind one interface: a window in, named losses out.

Each method owns its state (EM: the a* memory, its E-step schedule and variant; REINFORCE:
its reward baseline; noisy top-k: its balance losses) and puts it in the checkpoint::

    method = build(model, model_cfg, train_cfg, windows)
    losses = method.losses(window)      # Losses(nll, aux={name: scalar}, out, info)
    losses.total.backward(); optimiser step
    method.after_step(window, losses)   # e.g. REINFORCE's baseline update
    ckpt["method"] = method.state()     # method.load_state(ckpt["method"]) to resume

``Trainer.train_step`` is window -> method -> backward -> log, for every method.
"""

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


def build(model: lm.ModularLM, mcfg: ModelConfig, tcfg: TrainConfig, windows: int,
          train_tokens: torch.Tensor | None = None) -> Method:
    from modrt.train.methods import dense, em, hash, noisy_topk, reinforce

    cls = {"em": em.EM, "reinforce": reinforce.Reinforce, "noisy-topk": noisy_topk.NoisyTopK,
           "dense": dense.Dense, "hash": hash.Hash}[mcfg.method]
    if cls is hash.Hash:
        return cls(model, mcfg, tcfg, windows, train_tokens)
    return cls(model, mcfg, tcfg, windows)
