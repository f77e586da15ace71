"""Noisy top-k gating, the paper's second baseline.

Noisy top-k (Shazeer et al. 2017): the gating network's noisy top-k (``ModularGRU.gate``)
picks and weights the modules; the loss adds their balance terms,

    w_importance * CV(Importance)^2 + w_load * CV(Load)^2

with Importance the gate mass per module and Load the smooth count of how often each
module is in the top k, over all positions of the batch; CV = std / mean (population std).
"""

from __future__ import annotations

import torch

from modrt.train import model as lm
from modrt.train.methods.base import Batch, Losses, Method, Window


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation of a 1-D tensor: var / mean^2 (0 for one element)."""
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.float().var(unbiased=False) / (x.float().mean() ** 2 + eps)


def balance_loss(importance: torch.Tensor, load: torch.Tensor | None, w_importance: float,
                 w_load: float) -> torch.Tensor:
    """Shazeer et al.'s importance and load losses. (M,), (M,) -> scalar; (L, M) each (one
    row per modular layer, as in an image network): the layers' losses summed."""
    if importance.dim() == 2:
        return sum((balance_loss(i, None if load is None else l, w_importance, w_load)
                    for i, l in zip(importance, importance if load is None else load, strict=True)),
                   importance.new_zeros(()))
    loss = w_importance * cv_squared(importance)
    if load is not None:
        loss = loss + w_load * cv_squared(load)
    return loss


def noisy_topk_loss(model: lm.ModularLM, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor,
                    w_importance: float, w_load: float) -> Losses:
    """``noisy_topk_of`` one PTB window."""
    return noisy_topk_of(model, Window(x, y, h, 0, 0, 0), w_importance, w_load)


def noisy_topk_of(model, w: Batch, w_importance: float, w_load: float) -> Losses:
    out, ll = model.run_scored(w.x, w.h, None, w.y)
    nll = -ll.mean()
    load = out.load if model.cfg.k < model.cfg.modules else None
    aux = balance_loss(out.importance, load, w_importance, w_load)
    return Losses(nll, {"balance": aux}, out)


class NoisyTopK(Method):
    name = "noisy-topk"

    def losses(self, w: Batch) -> Losses:
        return noisy_topk_of(self.model, w, self.tcfg.importance_weight, self.tcfg.load_weight)
