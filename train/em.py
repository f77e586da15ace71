"""Generalised EM with a partial (Viterbi) E-step (Kirsch et al. 2018, §3; DESIGN.md §3).

For each example n (one BPTT window of one stream) a memory keeps a*_n, the best
selection found so far (T, K per modular layer).

E-step (no gradient, dropout off): S candidates per example, candidate 0 the stored a*_n
and 1..S-1 whole-window selections drawn from the controller while the RNN runs forward,
all in one batched pass over (S*B) rows; each is scored by
log p(y|x,a) + w log p(a|x) summed over the window (w = TrainConfig.prior_weight: the
paper's joint score at w=1; our default 0, see docs/design-notes.md), and the best is
written back. Ties keep
the stored a* (argmax takes the first maximum), so a* never gets worse under the current
parameters.

M-step: one gradient step on -mean log p(y|x,a*) - mean log p(a*|x): the first trains the
modules (only the selected ones get gradient) and the rest of the network, the second
trains the controller towards a*.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from modrt.train import model as lm
from modrt.train import routing


def e_step_due(window: int, epoch: int, every: int) -> bool:
    """Whether window ``window`` gets an E-step in epoch ``epoch``.

    Each example (window) is E-stepped on every ``every``-th of its visits, staggered over
    windows: in epoch e the windows w with (w + e) % every == 0, so across ``every``
    consecutive epochs every window gets exactly one. (Keying on the global step instead,
    step % every with step = e * W + w, aliases with the W windows of an epoch: with PTB's
    W = 415 and every = 10 only the windows w = 0 and 5 (mod 10) were ever E-stepped, and
    80% of the a* memory kept its random initialisation for the whole run.)
    """
    return (window + epoch) % every == 0


class EStep(NamedTuple):
    best: torch.Tensor  # (T, B, K) the new a*
    changed: torch.Tensor  # (B,) bool: a* replaced by a better candidate
    scores: torch.Tensor  # (S, B) log p(y, a | x) of every candidate
    candidates: torch.Tensor  # (S, T, B, K) candidate 0 is the stored a*


class MStepLoss(NamedTuple):
    loss: torch.Tensor  # scalar to minimise: nll + controller
    nll: torch.Tensor  # scalar: -mean log p(y | x, a*) per token (nats)
    controller: torch.Tensor  # scalar: -mean log p(a* | x) per token
    out: lm.RecurrentOutput


@torch.no_grad()
def e_step(model: lm.ModularLM, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor,
           a_star: torch.Tensor, samples: int, generator: torch.Generator | None = None,
           prior_weight: float = 1.0, dtype: torch.dtype | None = None) -> EStep:
    """Score the stored a* and S-1 fresh draws per window; keep the best.

    x, y: (T, B) inputs and targets; h: (B, H) state entering the window;
    a_star: (T, B, K) stored selections. The score is log p(y|x,a) + prior_weight * log p(a|x):
    1 is the paper's joint; 0 scores by the likelihood alone, the controller then acting only
    through the candidates it proposes (see docs/design-notes.md, "E-step score").
    ``dtype``: the precision of the head's matmul in the scores (None: the model's).
    """
    was_training = model.training
    model.eval()
    try:
        T, B = x.shape
        S = samples
        xs = x.repeat(1, S)  # (T, S*B): candidate s owns columns s*B .. s*B+B-1
        hs0 = h.repeat(S, 1)  # (S*B, H)
        out = model(xs, hs0, lm.sample_policy(keep=a_star, generator=generator))
        ll = model.token_log_likelihood(out.hs, y.repeat(1, S), dtype=dtype)  # (T, S*B)
        scores = (ll + prior_weight * out.log_pa).sum(0).view(S, B)  # (S, B)
        pick = scores.argmax(0)  # (B,) first maximum: ties keep the stored a*
        cands = out.a.view(T, S, B, -1).permute(1, 0, 2, 3)  # (S, T, B, K)
        best = cands[pick, :, torch.arange(B, device=x.device)]  # (B, T, K)
        best = best.permute(1, 0, 2).contiguous()  # (T, B, K)
        changed = (best != a_star).any(2).any(0)  # (B,)
        return EStep(best, changed, scores, cands)
    finally:
        model.train(was_training)


def m_step_loss(model: lm.ModularLM, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor,
                a_star: torch.Tensor | None) -> MStepLoss:
    """The M-step objective for one window; ``a_star`` None for the dense baseline."""
    policy = lm.given(a_star) if a_star is not None else None
    out = model(x, h, policy)
    logits = model.logits(out.hs)  # (T, B, V)
    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    ctrl = -out.log_pa.mean()
    return MStepLoss(nll + ctrl, nll, ctrl, out)


def stats(out: lm.RecurrentOutput, modules: int) -> dict[str, torch.Tensor]:
    """Controller entropies (nats) and module usage of one M-step's forward pass."""
    counts = routing.one_hot_counts(out.a, modules)
    if out.log_probs is None:
        zero = torch.zeros(())
        return {"entropy_example": zero, "entropy_batch": zero, "usage": counts}
    ex, batch = routing.entropies(out.log_probs.detach())
    return {"entropy_example": ex, "entropy_batch": batch, "usage": counts}
