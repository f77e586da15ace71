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


# splitmix64's constants (Steele, Lea & Flood 2014) as signed int64: torch has no uint64 math.
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping arithmetic): a bijection whose
    outputs look independent for neighbouring inputs."""
    x = (x ^ _srl(x, 30)) * _MIX1
    x = (x ^ _srl(x, 27)) * _MIX2
    return x ^ _srl(x, 31)


def key(base: torch.Tensor | int, *parts: torch.Tensor | int) -> torch.Tensor:
    """A random-looking int64 key per element from integer parts (broadcast), e.g.
    key(seed, epoch, example_ids, candidate): the same parts give the same key anywhere."""
    h = mix(torch.as_tensor(base, dtype=torch.long) + _GOLDEN)
    for p in parts:
        h = mix(h ^ (torch.as_tensor(p, dtype=torch.long, device=h.device) + _GOLDEN))
    return h


def uniform(keys: torch.Tensor) -> torch.Tensor:
    """A uniform draw in [0, 1) per key (float64, from the key's top 53 bits)."""
    return _srl(keys, 11).double() / float(1 << 53)


def sample_keyed(log_probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """One draw per slot from the controller, row b's from its own key (B,) int64: the
    draw of a row depends on its key and its probabilities only, not on the other rows or
    on any generator state (EM and REINFORCE key rows by example, so the draws do not
    depend on how examples are split over processes). Inverse CDF of 53 random bits per
    (row, slot). (B, K, M), (B,) -> (B, K)."""
    B, K, M = log_probs.shape
    slots = torch.arange(K, device=keys.device)
    u = uniform(key(keys.view(B, 1), slots.view(1, K)))  # (B, K)
    cdf = log_probs.detach().double().exp().cumsum(-1)  # (B, K, M)
    total = cdf[..., -1]
    if not bool(torch.isfinite(total).all()):  # as torch.multinomial refuses them
        raise RuntimeError("probability tensor contains either inf or nan (the controller's probabilities)")
    u = u * total  # the probabilities' own total (float32 rounding)
    a = torch.searchsorted(cdf, u.unsqueeze(-1), right=True).squeeze(-1)
    return a.clamp_(max=M - 1)


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
    if rule not in ("sum", "gate", "mean"):
        raise ValueError(f"combine rule {rule!r} unknown; choose sum or mean")
    if y.shape[0] == batch:  # one output per row (K = 1, or its slots agree): a permutation
        inverse = torch.empty_like(d.rows)
        inverse[d.rows] = torch.arange(batch, device=d.rows.device)
        return y.index_select(0, inverse)  # a gather, where zeros + index_add is two passes
    out = y.new_zeros(batch, *y.shape[1:]).index_add_(0, d.rows, y)
    if rule in ("sum", "gate"):  # gate: the outputs came already scaled by their weights
        return out
    return out / d.distinct.view(-1, *([1] * (y.dim() - 1))).to(out.dtype)


def entropies(log_probs: torch.Tensor, reduce=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-example entropy and the entropy of the batch-averaged distribution.

    (..., K, M) -> two scalars (nats); the paper logs both as exp(entropy): the first says
    how decided each example is, the second how many modules the batch uses. ``reduce``
    sums a tensor over the processes that hold the rest of the batch, in place
    (``distributed.World.sum_``); None: this is the whole batch.
    """
    M = log_probs.shape[-1]
    lp = log_probs.reshape(-1, log_probs.shape[-2], M)  # (N, K, M)
    p = lp.exp()
    N, K = lp.shape[:2]
    sums = torch.cat([(-(p * lp).sum(-1).sum()).double().view(1), p.sum(0).double().flatten(),
                      torch.tensor([float(N)], dtype=torch.float64, device=p.device)])
    if reduce is not None:
        sums = reduce(sums)
    n = sums[-1]
    per_example = (sums[0] / (n * K)).float()
    mean_p = (sums[1:-1] / n).view(K, M).float()  # (K, M)
    batch = -(mean_p * mean_p.clamp_min(1e-12).log()).sum(-1).mean()
    return per_example, batch


def one_hot_counts(a: torch.Tensor, modules: int) -> torch.Tensor:
    """How many (row, slot) selections each module got. (..., K) -> (M,)."""
    return torch.bincount(a.reshape(-1), minlength=modules)


__all__ = ["Dispatch", "combine", "dispatch", "entropies", "greedy", "key", "log_prob", "mix", "one_hot_counts",
           "sample", "sample_keyed"]
