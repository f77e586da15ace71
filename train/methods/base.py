"""The method interface's types (``methods/__init__.py`` draws it): a window in, losses out."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from modrt.train import distributed
from modrt.train import model as lm
from modrt.train.config import ModelConfig, TrainConfig


class Window(NamedTuple):
    """One PTB training step's input: window ``index`` of epoch ``epoch`` at global ``step``.
    Its examples are the window's B streams, n = index * B + b (the a* memory's rows)."""

    x: torch.Tensor  # (T, B) tokens
    y: torch.Tensor  # (T, B) next tokens
    h: torch.Tensor  # (B, H) state entering the window
    index: int
    epoch: int
    step: int
    first: int = 0  # the global index of this window's first stream (a rank's share of them)
    streams: int = 0  # B of the whole run's batch (0: this window's own)

    @property
    def rows(self) -> slice:
        """The a* memory's rows of this window's examples: n = index * B + stream."""
        B = self.x.shape[1]
        start = self.index * (self.streams or B) + self.first
        return slice(start, start + B)

    @property
    def ids(self) -> torch.Tensor:
        """The window's example indices (B,) long (CPU)."""
        return torch.arange(self.rows.start, self.rows.stop)

    @property
    def positions(self) -> int:
        """Selections per example: one per time step."""
        return self.x.shape[0]


class Images(NamedTuple):
    """One image training step's input: batch ``index`` of epoch ``epoch`` at ``step``.
    Its examples are training images, keyed by their index in the training set."""

    x: torch.Tensor  # (B, 3, H, W) normalised (and augmented) images
    y: torch.Tensor  # (B,) labels
    ids: torch.Tensor  # (B,) long: the images' indices in the training set (CPU)
    layers: int  # L: modular layers, one selection per example each
    index: int
    epoch: int
    step: int
    h: None = None  # no recurrent state

    @property
    def rows(self) -> torch.Tensor:
        return self.ids

    @property
    def positions(self) -> int:
        return self.layers


Batch = Window | Images


class Losses(NamedTuple):
    nll: torch.Tensor  # scalar: -mean log p(y | x, a) per token (nats)
    aux: dict[str, torch.Tensor]  # named auxiliary losses (controller, balance), minimised too
    out: Any  # the model's output: lm.RecurrentOutput, or conv.ImageOutput
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

    def __init__(self, model: lm.ModularLM, mcfg: ModelConfig, tcfg: TrainConfig, examples: int, positions: int):
        """``examples``: N, the training examples (PTB: windows x streams; images: images);
        ``positions``: P, the selections each one holds (PTB: time steps; images: layers)."""
        self.model, self.mcfg, self.tcfg = model, mcfg, tcfg
        self.examples, self.positions = examples, positions
        # The run's processes (``distributed.World``; the trainer sets it): one process, where
        # every exchange is the identity, unless launched by torchrun.
        self.world = distributed.SINGLE

    def keys(self, w: Batch, *parts) -> torch.Tensor:
        """Per-example sampling keys (B,) for batch ``w``: a function of the run's seed, the
        examples' global indices and ``parts`` only (``routing.sample_keyed``), so a draw
        does not depend on which process holds the example."""
        from modrt.train import routing

        return routing.key(self.tcfg.seed, *parts, w.ids.to(w.x.device))

    def losses(self, w: Batch) -> Losses:
        raise NotImplementedError

    def after_step(self, w: Batch, losses: Losses) -> None:
        """Called after the optimiser step."""

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore ``state()`` from a checkpoint."""


def stats(out, modules: int, world=None) -> dict[str, torch.Tensor]:
    """Controller entropies (nats) and module usage of one step's forward pass; with a
    ``world`` of several processes, of the whole batch over all of them."""
    from modrt.train import routing

    reduce = None if world is None or world.size == 1 else world.sum_
    counts = routing.one_hot_counts(out.a, modules)
    if reduce is not None:
        counts = reduce(counts)
    if out.log_probs is None:
        zero = torch.zeros(())
        return {"entropy_example": zero, "entropy_batch": zero, "usage": counts}
    ex, batch = routing.entropies(out.log_probs.detach(), reduce)
    return {"entropy_example": ex, "entropy_batch": batch, "usage": counts}


__all__ = ["Batch", "Images", "Losses", "Method", "Window", "stats"]
