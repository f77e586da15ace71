"""Generalised EM with a partial (Viterbi) E-step (Kirsch et al. 2018, §3; DESIGN.md §3),
and its E-step variants (docs/design-notes.md, "E-step variants").

For each example n (one BPTT window of one stream; or one training image) a memory keeps
a*_n, the best selection found so far (T, K for a window; L, K over an image network's L
modular layers).

E-step (no gradient, dropout off): S candidates per example, candidate 0 the stored a*_n
and 1..S-1 whole-window selections drawn from the controller while the RNN runs forward,
all in one batched pass over (S*B) rows; each is scored by
log p(y|x,a) + w log p(a|x) summed over the window (w = TrainConfig.prior_weight: the
paper's joint score at w=1; our default 0, see docs/design-notes.md), and the best is
written back. Ties keep
the stored a* (argmax takes the first maximum), so a* never gets worse under the current
parameters.

Variants, each a TrainConfig option; none adds a term to the M-step's loss:

- ``e_step="position"``: a per-position search along the window (``position_e_step``);
- ``balance_rate``: loss-free balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load
  Balancing Strategy for Mixture-of-Experts"): a per-module bias added to the E-step's
  scores, moved against each module's load after every E-step, with no gradient;
- ``warm_start``: sparse upcycling (Komatsuzaki et al. 2023): a dense cell trained first,
  then copied into every module with small noise;
- ``prior_anneal``: the prior weight raised linearly from 0 over the first steps;
- ``a_star_init="hash"`` (PTB): the memory starts from hash routing's frequency-balanced
  word -> module table (Roller et al. 2021; ``methods/hash.py``) instead of uniform draws:
  every module starts with an equal share of the text and a selection the controller can
  learn from the input word alone. EM's E-step then only replaces it where a candidate
  scores better, as from any other start.

M-step: one gradient step on -mean log p(y|x,a*) - mean log p(a*|x): the first trains the
modules (only the selected ones get gradient) and the rest of the network, the second
trains the controller towards a*.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from modrt.train import data, routing
from modrt.train import model as lm
from modrt.train.methods.base import Batch, Losses, Method, Window
from modrt.train.methods.hash import table_of

# Warm start: the copies differ from the dense cell by Gaussian noise of this std.
UPCYCLE_NOISE = 0.01


def hashed_memory(tokens: torch.Tensor, bptt: int, modules: int, k: int, vocab: int) -> torch.Tensor:
    """The a* memory (W*B, T, K) int16 that hash routing's table gives: row n = w*B + b,
    position t holds the modules of window w's input word x_t in stream b
    (``data.window``; a short last window's unused positions get word 0's)."""
    table = table_of(tokens, vocab, modules, k)  # (V, K)
    W, B = data.num_windows(tokens, bptt), tokens.shape[1]
    x = tokens[:-1]  # every window's inputs, back to back (the targets are x shifted by one)
    x = torch.cat([x, x.new_zeros(W * bptt - len(x), B)])  # (W*T, B)
    return table[x.view(W, bptt, B).permute(0, 2, 1).reshape(W * B, bptt)].to(torch.int16)


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


@torch.no_grad()
def e_step(model: lm.ModularLM, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor,
           a_star: torch.Tensor, samples: int, generator: torch.Generator | None = None,
           prior_weight: float = 1.0, dtype: torch.dtype | None = None,
           bias: torch.Tensor | None = None, keys: torch.Tensor | None = None) -> EStep:
    """``e_step_of`` for one PTB window: x, y (T, B), h (B, H) the state entering it."""
    return e_step_of(model, Window(x, y, h, 0, 0, 0), a_star, samples, generator, prior_weight, dtype, bias, keys)


@torch.no_grad()
def e_step_of(model, w: Batch, a_star: torch.Tensor, samples: int, generator: torch.Generator | None = None,
              prior_weight: float = 1.0, dtype: torch.dtype | None = None,
              bias: torch.Tensor | None = None, keys: torch.Tensor | None = None) -> EStep:
    """Score the stored a* and S-1 fresh draws per example; keep the best.

    ``w``: a PTB window or a batch of images; a_star: (P, B, K) stored selections (P: time
    steps, or modular layers). The score is log p(y|x,a) + prior_weight * log p(a|x):
    1 is the paper's joint; 0 scores by the likelihood alone, the controller then acting only
    through the candidates it proposes (see docs/design-notes.md, "E-step score").
    ``dtype``: the precision of the head's matmul in the scores (None: the model's).
    ``bias`` (M,), or (P, M) per position (a layer's own modules): added to a candidate's
    score once per position for each distinct module it uses there (balancing; None: none).
    ``keys`` (B,) int64: example b's draws come from its key alone (``routing.sample_keyed``:
    they do not depend on the batch it is in, or on the process); None: from ``generator``.
    """
    was_training = model.training
    model.eval()
    try:
        P, B = a_star.shape[:2]
        S = samples
        # Candidate s owns examples s*B .. s*B+B-1; candidate 0 follows the stored a*.
        rows = None if keys is None else routing.key(keys.view(1, B), torch.arange(S, device=keys.device).view(S, 1))
        policy = lm.sample_policy(keep=a_star, generator=generator, keys=None if rows is None else rows.flatten())
        out = model.run_examples(w.x, w.h, policy, repeat=S)
        ll = model.example_log_likelihood(out, w.y, repeat=S, dtype=dtype)  # (T, S*B), or (1, S*B)
        prior = prior_weight * out.log_pa  # (P, S*B)
        if bias is not None:
            prior = prior + bias_term(out.a, bias)
        scores = (ll.sum(0) + prior.sum(0)).view(S, B)  # (S, B)
        pick = scores.argmax(0)  # (B,) first maximum: ties keep the stored a*
        cands = out.a.view(P, S, B, -1).permute(1, 0, 2, 3)  # (S, P, B, K)
        best = cands[pick, :, torch.arange(B, device=a_star.device)]  # (B, P, K)
        best = best.permute(1, 0, 2).contiguous()  # (P, B, K)
        changed = (best != a_star).any(2).any(0)  # (B,)
        return EStep(best, changed, scores, cands)
    finally:
        model.train(was_training)


def bias_term(a: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The balancing bias of selections a (P, ..., K): the sum of bias over each one's
    distinct modules; bias (M,), or (P, M) one row per position. -> (P, ...)."""
    M = bias.shape[-1]
    mask = torch.zeros(*a.shape[:-1], M, device=a.device).scatter_(-1, a, 1.0)
    if bias.dim() == 1:
        return mask @ bias
    return (mask * bias.view(bias.shape[0], *([1] * (a.dim() - 2)), M)).sum(-1)


@torch.no_grad()
def window_scores(model: lm.ModularLM, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor, a: torch.Tensor,
                  prior_weight: float, dtype: torch.dtype | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """Each window's score under selections a (T, B, K): sum_t log p(y_t|x,a) +
    prior_weight * log p(a_t|x) (+ bias). -> (B,)."""
    out = model(x, h, lm.given(a))
    s = model.token_log_likelihood(out.hs, y, dtype=dtype) + prior_weight * out.log_pa
    if bias is not None:
        s = s + bias_term(a, bias)
    return s.sum(0)


@torch.no_grad()
def position_e_step(model: lm.ModularLM, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor,
                    a_star: torch.Tensor, samples: int, generator: torch.Generator | None = None,
                    prior_weight: float = 1.0, dtype: torch.dtype | None = None,
                    bias: torch.Tensor | None = None, keys: torch.Tensor | None = None) -> EStep:
    """A per-position (greedy Viterbi-style) search for a better a*.

    Walk the window: at step t, from the state the path has reached, score each candidate
    selection c by that step's log p(y_t | x, c) + prior_weight * log p(c | x) (+ bias),
    keep the best and follow its new state. Candidates: a*_t first, then (K=1 and S >= M)
    every module, else S-1 draws from the controller. The new path replaces a* only if its
    window score is above a*'s, so the E-step never lowers a window's score; ties keep a*.
    A whole-window draw must win back the whole window's prior to replace a*; one position's
    change here needs to pay only for itself.
    ``scores`` holds (2, B): a*'s window score, then the path's. ``candidates`` (2, T, B, K).
    ``keys`` (B,): the draws keyed by example, as in ``e_step_of``.
    """
    was_training = model.training
    model.eval()
    try:
        T, B = x.shape
        K, M = model.cfg.k, model.cfg.modules
        layer = model.layer
        star = window_scores(model, x, y, h, a_star, prior_weight, dtype, bias)  # (B,)
        e = model.embed(x)  # (T, B, E); eval: no dropout
        everyone = K == 1 and samples >= M
        if layer.compute_all:
            w_ih, b_ih, w_hh, b_hh = layer.stacked()
            gi = F.linear(e, w_ih, b_ih)
        path = torch.empty_like(a_star)
        total = torch.zeros(B, device=x.device)
        rows = torch.arange(B, device=x.device)
        for t in range(T):
            lp = layer.scores(e[t], h)  # (B, K, M)
            if everyone:
                rest = torch.arange(M, device=x.device).view(1, M, 1).expand(B, M, 1)
            else:
                rest = torch.stack([routing.sample(lp, generator) if keys is None else
                                    routing.sample_keyed(lp, routing.key(keys, t, s)) for s in range(1, samples)], 1)
            cand = torch.cat([a_star[t].unsqueeze(1), rest], 1)  # (B, C, K)
            C = cand.shape[1]
            if layer.compute_all:
                states = layer.all_states(gi[t], h, w_hh, b_hh)  # (B, M, H)
                masks = layer.mask(cand.reshape(B * C, K)).view(B, C, M)
                new = torch.einsum("bcm,bmh->bch", masks, states)
            else:
                new = torch.stack([layer.step(e[t], h, cand[:, c]) for c in range(C)], 1)  # (B, C, H)
            ll = distinct_log_likelihood(model, new, y[t], cand, M, dtype)
            prior = routing.log_prob(lp.unsqueeze(1).expand(B, C, K, M).reshape(B * C, K, M),
                                     cand.reshape(B * C, K)).view(B, C)
            score = ll + prior_weight * prior
            if bias is not None:
                score = score + bias_term(cand, bias)
            pick = score.argmax(1)  # first maximum: a*_t on ties
            path[t] = cand[rows, pick]
            h = new[rows, pick]
            total += score[rows, pick]
        better = total > star
        best = torch.where(better.view(1, B, 1), path, a_star)
        changed = (best != a_star).any(2).any(0)
        return EStep(best, changed, torch.stack([star, total]), torch.stack([a_star, path]))
    finally:
        model.train(was_training)


def distinct_log_likelihood(model: lm.ModularLM, states: torch.Tensor, y_t: torch.Tensor,
                            cand: torch.Tensor, modules: int, dtype: torch.dtype | None) -> torch.Tensor:
    """log p(y_t | state) of every candidate (B, C), the head run once per distinct
    selection of a row: draws from a decided controller repeat each other and a*_t, and
    the head is most of the E-step's cost at small sizes. states (B, C, H), y_t (B,),
    cand (B, C, K) -> (B, C); a repeated candidate gets its first occurrence's value."""
    B, C, K = cand.shape
    key = torch.zeros(B, C, dtype=torch.long, device=cand.device)
    for k_, col in enumerate(cand.sort(-1).values.unbind(-1)):  # a selection is a set of modules
        key += col * modules ** k_
    first = (key.unsqueeze(2) == key.unsqueeze(1)).int().argmax(2)  # (B, C): index of the first equal
    keep = first == torch.arange(C, device=cand.device)  # (B, C) the distinct ones
    b, c = keep.nonzero(as_tuple=True)
    ll = torch.empty(B, C, device=states.device)
    ll[b, c] = model.token_log_likelihood(states[b, c].unsqueeze(0), y_t[b].unsqueeze(0), dtype=dtype)[0]
    return ll.gather(1, first)


def m_step_loss(model: lm.ModularLM, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor,
                a_star: torch.Tensor) -> Losses:
    """``m_step_of`` one PTB window."""
    return m_step_of(model, Window(x, y, h, 0, 0, 0), a_star)


def m_step_of(model, w: Batch, a_star: torch.Tensor) -> Losses:
    """The M-step objective for one batch: -mean log p(y|x,a*) - mean log p(a*|x) (the
    second per position: per time step, or per modular layer)."""
    out, ll = model.run_scored(w.x, w.h, lm.given(a_star), w.y)
    return Losses(-ll.mean(), {"controller": -out.log_pa.mean()}, out)


class EM(Method):
    """Owns the a* memory (one (P, K) selection per example: PTB n = window * B + stream,
    P time steps; images n = the image's index, P modular layers; uniform at random at
    first, or hash-initialised), the E-step schedule and variant, the balancing bias and the
    warm start. ``train_tokens``: PTB's batchified training text (N/B, B), for the hash start."""

    name = "em"

    def __init__(self, model, mcfg, tcfg, examples, positions, train_tokens: torch.Tensor | None = None):
        super().__init__(model, mcfg, tcfg, examples, positions)
        K, M = mcfg.k, mcfg.modules
        recurrent = isinstance(model, lm.ModularLM)
        if tcfg.e_step == "position" and not recurrent:
            raise ValueError("the position E-step walks a recurrent window; it has no meaning for images")
        if tcfg.a_star_init == "hash":
            if not recurrent or train_tokens is None:
                raise ValueError("the hash start keys a* on input words; images have none (use random)")
            self.memory = hashed_memory(train_tokens, positions, M, K, mcfg.vocab_size)
        else:
            self.memory = torch.randint(0, M, (examples, positions, K), dtype=torch.int16)
        if self.memory.shape != (examples, positions, K):
            raise ValueError(f"a* memory {tuple(self.memory.shape)} != {(examples, positions, K)}")
        # One bias row per modular layer that has its own modules (PTB: one layer, (M,)).
        groups = len(model.module_lists())
        self.bias = torch.zeros(M) if groups == 1 else torch.zeros(groups, M)
        self.upcycled = tcfg.warm_start == 0

    def prior_weight(self, step: int) -> float:
        tc = self.tcfg
        if not tc.prior_anneal:
            return tc.prior_weight
        return tc.prior_weight * min(1.0, max(0, step - tc.warm_start) / tc.prior_anneal)

    def losses(self, w: Batch) -> Losses:
        tc, dev = self.tcfg, w.x.device
        P, K = w.positions, self.mcfg.k
        a_star = self.memory[w.rows, :P].long().permute(1, 0, 2).to(dev)  # (P, B, K)
        if w.step < tc.warm_start:  # the dense phase: modules 0..K-1 on every row, no controller loss
            a = torch.arange(K, device=dev).expand(*a_star.shape[:2], K)
            out, ll = self.model.run_scored(w.x, w.h, lm.given(a), w.y)
            return Losses(-ll.mean(), {}, out)
        if not self.upcycled:
            self.upcycle()
        info = {}
        if e_step_due(w.index, w.epoch, tc.e_step_every):
            bias = self.bias.to(dev) if tc.balance_rate else None
            pw, dtype = self.prior_weight(w.step), getattr(torch, tc.e_step_dtype)
            keys = self.keys(w, w.epoch)  # an example's draws: (seed, epoch, its index)
            if tc.e_step == "position":
                e = position_e_step(self.model, w.x, w.y, w.h, a_star, tc.samples, prior_weight=pw, dtype=dtype,
                                    bias=bias, keys=keys)
            else:
                e = e_step_of(self.model, w, a_star, tc.samples, prior_weight=pw, dtype=dtype, bias=bias, keys=keys)
            a_star = e.best
            # Every rank keeps the whole memory: the ranks exchange their rows' new a*.
            ids, new = self.world.cat_rows(w.ids, a_star.permute(1, 0, 2).to(torch.int16).cpu())  # (n, P, K)
            self.memory[ids, :P] = new
            if tc.balance_rate:
                self.rebalance(new.permute(1, 0, 2))
            info = {"e_changed": int(e.changed.sum()), "e_total": e.changed.numel()}
        return m_step_of(self.model, w, a_star)._replace(info=info)

    def rebalance(self, a_star: torch.Tensor) -> None:
        """Move the bias against each module's load in the new a* (P, B, K): over all
        positions for one layer, per layer's own row otherwise."""
        M = self.mcfg.modules
        if self.bias.dim() == 1:
            load = torch.bincount(a_star.flatten(), minlength=M).float()
            self.bias += self.tcfg.balance_rate * torch.sign(load.mean() - load)
            return
        load = torch.stack([torch.bincount(row.flatten(), minlength=M) for row in a_star]).float()  # (L, M)
        self.bias += self.tcfg.balance_rate * torch.sign(load.mean(1, keepdim=True) - load)

    @torch.no_grad()
    def upcycle(self) -> None:
        """Copy the dense phase's modules 0..K-1 into every module of each layer, plus small noise."""
        K = self.mcfg.k
        g = torch.Generator().manual_seed(self.tcfg.seed)  # the same noise on every rank
        for mods in self.model.module_lists():
            for m in range(K, self.mcfg.modules):
                for p, src in zip(mods[m].parameters(), mods[m % K].parameters(), strict=True):
                    p.copy_(src + UPCYCLE_NOISE * torch.randn(src.shape, generator=g).to(src.device))
                for b, src in zip(mods[m].buffers(), mods[m % K].buffers(), strict=True):
                    b.copy_(src)  # batch norm's running statistics
        self.upcycled = True

    def state(self) -> dict[str, Any]:
        return {"memory": self.memory, "bias": self.bias, "upcycled": self.upcycled}

    def load_state(self, state: dict[str, Any]) -> None:
        self.memory, self.bias, self.upcycled = state["memory"], state["bias"], bool(state["upcycled"])
