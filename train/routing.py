"""Routing for a modular layer: scores -> selection -> dispatch -> combine.

Axis letters used throughout modrt:

    B  batch rows          T  time steps        M  modules
    K  controller slots    D  features          S  E-step candidates

The controller gives K independent softmaxes over the M modules (one per slot, as in
the official libmodular code). A selection ``a`` is (B, K) module ids. A module drawn
in two slots counts once: the layer combines the *distinct* selected modules (sum, or
mean over the distinct ones). ``modrt.routing`` is the numpy twin of this file used by
the ONNX runtime; tests keep the two equal.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Dispatch(NamedTuple):
    """Rows grouped by module: module m serves ``rows[offsets[m]:offsets[m+1]]``."""

    rows: torch.Tensor  # (R,) long, row ids sorted by module (stable in row order)
    offsets: list[int]  # (M+1,) start of each module's group in ``rows``
    distinct: torch.Tensor  # (B,) number of distinct modules each row uses


def greedy(log_probs: torch.Tensor) -> torch.Tensor:
    """The most probable selection: the argmax of each slot. (B, K, M) -> (B, K)."""
    return log_probs.argmax(dim=-1)


def sample(log_probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per slot from the controller. (B, K, M) -> (B, K)."""
    B, K, M = log_probs.shape
    flat = log_probs.reshape(B * K, M).exp()  # (B*K, M)
    return torch.multinomial(flat, 1, generator=generator).view(B, K)


def log_prob(log_probs: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """log p(a | x) summed over slots. (B, K, M), (B, K) -> (B,)."""
    return log_probs.gather(-1, a.unsqueeze(-1)).squeeze(-1).sum(-1)


def dispatch(a: torch.Tensor, modules: int) -> Dispatch:
    """Group rows by the distinct modules they selected (argsort + offsets, no row loop)."""
    B = a.shape[0]
    mask = torch.zeros(B, modules, dtype=torch.bool, device=a.device)  # (B, M)
    mask.scatter_(1, a, True)  # a module in two slots counts once
    rows, mods = mask.nonzero(as_tuple=True)  # (R,), (R,) sorted by row
    order = torch.argsort(mods, stable=True)
    counts = torch.bincount(mods, minlength=modules)  # (M,)
    offsets = [0] + torch.cumsum(counts, 0).tolist()
    return Dispatch(rows=rows[order], offsets=offsets, distinct=mask.sum(1))


def combine(y: torch.Tensor, d: Dispatch, batch: int, rule: str) -> torch.Tensor:
    """Scatter module outputs back to batch order and combine. (R, ...) -> (B, ...), e.g.
    (R, D) -> (B, D), or feature maps (R, C, H, W) -> (B, C, H, W)."""
    out = y.new_zeros(batch, *y.shape[1:]).index_add_(0, d.rows, y)
    if rule in ("sum", "gate"):  # gate: the outputs came already scaled by their weights
        return out
    if rule == "mean":
        return out / d.distinct.view(-1, *([1] * (y.dim() - 1))).to(out.dtype)
    raise ValueError(f"combine rule {rule!r} unknown; choose sum or mean")


def entropies(log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-example entropy and the entropy of the batch-averaged distribution.

    (..., K, M) -> two scalars (nats); the paper logs both as exp(entropy): the first says
    how decided each example is, the second how many modules the batch uses.
    """
    M = log_probs.shape[-1]
    lp = log_probs.reshape(-1, log_probs.shape[-2], M)  # (N, K, M)
    p = lp.exp()
    per_example = -(p * lp).sum(-1).mean()
    mean_p = p.mean(0)  # (K, M)
    batch = -(mean_p * mean_p.clamp_min(1e-12).log()).sum(-1).mean()
    return per_example, batch


def one_hot_counts(a: torch.Tensor, modules: int) -> torch.Tensor:
    """How many (row, slot) selections each module got. (..., K) -> (M,)."""
    return torch.bincount(a.reshape(-1), minlength=modules)


__all__ = ["Dispatch", "greedy", "sample", "log_prob", "dispatch", "combine", "entropies", "one_hot_counts"]
