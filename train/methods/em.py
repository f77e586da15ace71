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
  then copied into every module with noise of 1% of each tensor's RMS;
- ``prior_anneal``: the prior weight raised linearly from 0 over the first steps;
- ``e_step="word"`` (PTB): a* is a word -> modules table, not a memory per position
  (``word_e_step``): a* at every position is the table's entry for its input word, so the
  controller can always predict it from its input; the E-step changes a word's entry when an
  alternative scored better on its occurrences;
- ``a_star_init="hash"`` (PTB): the memory starts from hash routing's frequency-balanced
  word -> module table (Roller et al. 2021; ``methods/hash.py``) instead of uniform draws:
  every module starts with an equal share of the text and a selection the controller can
  learn from the input word alone. EM's E-step then only replaces it where a candidate
  scores better, as from any other start.
- ``a_star_init="controller"``: each example's a* is set, at its first E-step (after any
  warm start), to the controller's own most probable modules, taken within the capacity cap
  when there is one (``controller_start``): a start the controller can represent by
  construction, its images' counterpart of the hash start.

M-step: one gradient step on -mean log p(y|x,a*) - mean log p(a*|x): the first trains the
modules (only the selected ones get gradient) and the rest of the network, the second
trains the controller towards a*.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from modrt.train import data, routing
from modrt.train import model as lm
from modrt.train.methods.base import Batch, Losses, Method, Window
from modrt.train.methods.hash import balanced_table, table_of

# Warm start: each copy differs from the dense cell by Gaussian noise of this std relative to
# the copied tensor's root mean square (a fixed std of 0.01 was 20-60% of a wide conv
# weight's RMS, 0.017-0.024 at initialisation, 0.05 seven epochs later: the copies lost
# 5 points of test accuracy before EM began).
UPCYCLE_NOISE = 0.01
# The word E-step changes a word's entry only where the gain is evidence, not noise: an
# alternative scored on at least WORD_MIN_SEEN of the word's occurrences whose mean gain is
# above WORD_Z standard errors (in a 60-step pilot, moving on any positive mean moved a third
# of each window's words per step while the modules were still alike).
WORD_MIN_SEEN = 2
WORD_Z = 2.0
# The word E-step scores an occurrence of word w with probability min(1, sqrt(t
# / f_w)), f_w its share of the training text: the subsampling of frequent words of Mikolov
# et al. (2013, "Distributed Representations of Words and Phrases"). On PTB 96 words are
# thinned (the most frequent, "the", to 14%: still ~6,000 scored occurrences an epoch) and
# 65% of the positions are scored; the E-step's cost is its candidates' heads, so this
# cuts it by a third while the rare words, whose evidence is scarce, keep all of theirs.
# The threshold is TrainConfig.word_subsample (--word-subsample; 0: every position).
# The salt of the keyed draw that picks the scored positions (apart from the candidates').
_SUBSAMPLE_SALT = 0x5B5A


def word_keep(counts: torch.Tensor, t: float) -> torch.Tensor | None:
    """Each word's probability (V,) float32 of being scored by the word E-step, from its
    training-text counts (V,); None (score every position) for t = 0."""
    if t == 0:
        return None
    share = counts.double() / counts.sum().clamp(min=1)
    return (t / share).sqrt().clamp(max=1.0).nan_to_num(1.0).float()


def hashed_memory(tokens: torch.Tensor, bptt: int, modules: int, k: int, vocab: int) -> torch.Tensor:
    """The a* memory (W*B, T, K) int16 that hash routing's table gives: row n = w*B + b,
    position t holds the modules of window w's input word x_t in stream b
    (``data.window``; a short last window's unused positions get word 0's)."""
    table = table_of(tokens, vocab, modules, k)  # (V, K)
    W, B = data.num_windows(tokens, bptt), tokens.shape[1]
    x = tokens[:-1]  # every window's inputs, back to back (the targets are x shifted by one)
    x = torch.cat([x, x.new_zeros(W * bptt - len(x), B)])  # (W*T, B)
    return table[x.view(W, bptt, B).permute(0, 2, 1).reshape(W * B, bptt)].to(torch.int16)


@contextmanager
def scoring(model) -> Iterator[None]:
    """The E-steps score in eval mode (no dropout) and leave the model's mode as it was."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


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
    with scoring(model):
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


def group_counts(a: torch.Tensor, groups: int, modules: int) -> torch.Tensor:
    """How many entries of selections a (..., P, K) name each module, per group: (G, M)
    float64. One group (PTB's one modular layer): over every position; else group g is
    position g (an image network's layer g, which has its own modules)."""
    a = a.long()
    if groups == 1:
        return torch.bincount(a.flatten(), minlength=modules).double().view(1, modules)
    P = a.shape[-2]
    if P != groups:
        raise ValueError(f"{P} positions cannot be {groups} groups")
    rows = a.transpose(-2, 0).reshape(P, -1)  # (P, everything else)
    return torch.stack([torch.bincount(r, minlength=modules) for r in rows]).double()


def capped_pick(scores: torch.Tensor, cands: torch.Tensor, load: torch.Tensor, factor: float) -> torch.Tensor:
    """The E-step's choice of candidate per example under a capacity cap (BASE layers'
    balanced assignment, Lewis et al. 2021, made greedy as for the word table).

    scores (S, B) and cands (S, P, B, K): ``e_step_of``'s, candidate 0 the stored a*; load
    (G, M) float64: each group's module counts over the whole a* memory, updated in place.
    Examples are taken best gain first; each takes its best-scoring candidate that moves no
    module above ``factor`` times an even share of its group's load (leaving a module, or
    staying in one, is always allowed), else keeps a*. Returns the pick (B,) long."""
    S, P, B, K = cands.shape
    G, M = load.shape
    cap = (factor * load.sum(1, keepdim=True) / M).numpy()  # (G, 1): the total is fixed
    counts = torch.stack([_example_counts(cands[s], G, M) for s in range(S)]).numpy()  # (S, B, G, M)
    sc = scores.double().cpu().numpy()
    gain = sc.max(0) - sc[0]
    pick = torch.zeros(B, dtype=torch.long)
    held = load.numpy()  # a view: updated in place
    for b in gain.argsort()[::-1]:
        if gain[b] <= 0:
            break
        old = counts[0, b]
        for s in sc[:, b].argsort(kind="stable")[::-1]:
            if s == 0 or sc[s, b] <= sc[0, b]:
                break
            new = counts[s, b]
            rise = new > old
            if ((held - old + new <= cap) | ~rise).all():
                held += new - old
                pick[b] = int(s)
                break
    return pick


def controller_start(log_probs: torch.Tensor, old: torch.Tensor, load: torch.Tensor | None,
                     factor: float) -> torch.Tensor:
    """Each example's a* from its controller's log-probabilities: per position and slot the
    most probable module, or, with a capacity cap, the most probable one that keeps its
    module within ``factor`` x an even share of the group's load (BASE layers' greedy
    balanced assignment; the surest examples first).

    log_probs (P, B, K, M) along the greedy path; old (P, B, K) the examples' current a*
    (counted in load); load (G, M) float64 updated in place, or None (no cap). -> (P, B, K)."""
    if load is None:
        return log_probs.argmax(-1)
    P, B, K, M = log_probs.shape
    G = load.shape[0]
    cap = (factor * load.sum(1) / M).numpy()  # (G,)
    lp = log_probs.double().cpu().numpy()
    held = load.numpy()  # a view: updated in place
    out = old.long().cpu().clone()
    o = out.numpy()
    for b in lp.max(-1).sum((0, 2)).argsort()[::-1]:  # the surest examples first
        for p in range(P):
            g = p if G > 1 else 0
            for k in range(K):
                held[g, o[p, b, k]] -= 1
                taken = set(o[p, b, :k].tolist())
                for m in lp[p, b, k].argsort()[::-1]:
                    if m not in taken and held[g, m] + 1 <= cap[g]:
                        break
                else:  # every module is full: keep the old one
                    m = o[p, b, k]
                o[p, b, k] = m
                held[g, m] += 1
    return out.to(log_probs.device)


def _example_counts(a: torch.Tensor, groups: int, modules: int) -> torch.Tensor:
    """Per example, its selection's module counts per group: a (P, B, K) -> (B, G, M) float64."""
    P, B, K = a.shape
    hot = torch.zeros(P, B, modules, dtype=torch.float64).scatter_add_(
        2, a.long().cpu(), torch.ones(P, B, K, dtype=torch.float64))  # (P, B, M)
    if groups == 1:
        return hot.sum(0).unsqueeze(1)
    return hot.permute(1, 0, 2).contiguous()


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
    with scoring(model):
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


class WordGains(NamedTuple):
    """The word E-step's evidence from one window: candidate c at position (t, b) is the
    table's selection for x[t, b] with slot ``slot`` set to module ``module``."""

    gain: torch.Tensor  # (T, B, C) log p(y_t | candidate) - log p(y_t | a*_t), one step
    slot: torch.Tensor  # (T, B, C) long
    module: torch.Tensor  # (T, B, C) long
    scored: torch.Tensor | None = None  # (T, B) bool: the positions scored (None: all; 0 gain elsewhere)


@torch.no_grad()
def word_e_step(model: lm.ModularLM, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor, table: torch.Tensor,
                samples: int, dtype: torch.dtype | None = None, keys: torch.Tensor | None = None,
                generator: torch.Generator | None = None,
                base: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
                keep: torch.Tensor | None = None, prior_weight: float = 0.0) -> WordGains:
    """Score one-slot changes of the word table's selections along a window.

    a*_t = table[x_t] (T, B, K). The RNN follows a*; at every position, from the state a*
    reached there, each candidate (a*_t with one slot set to a module it does not hold) is
    scored by that step's log p(y_t | x, candidate) against a*_t's: a one-step lookahead, all
    positions at once. Candidates: every (slot, module) pair when S - 1 >= K (M - K) (K=1,
    S >= M: every module), else S - 1 uniform draws of a pair, keyed by example (``keys``
    (B,), as ``e_step_of``) or from ``generator``. Ties and losses are gains <= 0, which never
    change the table (``EM.word_update``).

    ``prior_weight`` w: a candidate's gain also counts w * (log p(m | x, h) - log p(a*_t's
    module | x, h)) of the controller in the changed slot, the prior term of the paper's
    joint score at one step: a word then moves towards the modules the controller can
    predict from it, which the likelihood alone leaves to the controller to learn.

    ``base``: (hs (T, B, H), log p(y_t) (T, B), the controller's log-probabilities (T, B, K,
    M) or None) along a* when the caller has them already, as an eval-mode float32 pass
    would give them (the M-step's forward without dropout: ``EM`` passes it, which saves a
    forward and a head, a quarter of this E-step at S = 4).

    ``keep`` (V,): score position (t, b) with probability keep[x[t, b]] (``word_keep``; a
    draw keyed by (example, t) as the candidates, or from ``generator``), the others not at
    all: their gains are 0 and ``scored`` says which were."""
    with scoring(model):
        T, B = x.shape
        K, M = model.cfg.k, model.cfg.modules
        layer = model.layer
        a = table[x]  # (T, B, K)
        if base is None:
            out = model(x, h, lm.given(a))
            hs, base_ll, log_probs = out.hs, None, out.log_probs
        else:
            hs, base_ll, log_probs = base
        N = T * B
        prev = torch.cat([h.unsqueeze(0), hs[:-1]]).reshape(N, -1)  # the state entering each step
        flat = a.reshape(N, K)
        held = torch.zeros(N, M, device=x.device).scatter_(1, flat, 1.0)
        others = held.argsort(dim=1, stable=True)[:, : M - K]  # (N, M-K) the modules a*_t does not hold
        pairs = K * (M - K)
        if samples - 1 >= pairs:
            r = torch.arange(pairs, device=x.device).expand(N, pairs)
        elif keys is None:
            r = torch.randint(0, pairs, (N, samples - 1), generator=generator).to(x.device)
        else:
            uniform = torch.zeros(N, samples - 1, pairs, device=x.device)
            rows = routing.key(keys.view(1, B), torch.arange(T, device=x.device).view(T, 1)).flatten()
            r = routing.sample_keyed(uniform, rows)  # (N, S-1)
        slot, module = r // (M - K), others.gather(1, r % (M - K))  # (N, C)
        C = r.shape[1]
        shape = (T, B, C)
        if C == 0:  # S = 1: a* alone, no candidate (the table stays as it started)
            return WordGains(x.new_zeros(shape, dtype=torch.float), slot.reshape(shape), module.reshape(shape))
        scored = None
        if keep is not None:
            if keys is None:
                u = torch.rand(N, generator=generator).to(x.device)
            else:
                t = torch.arange(T, device=x.device).view(T, 1)
                u = routing.uniform(routing.key(keys.view(1, B), t, _SUBSAMPLE_SALT)).flatten()  # (N,)
            scored = u < keep.to(x.device)[x.flatten()]
        at = scored.nonzero(as_tuple=True)[0] if scored is not None else slice(None)
        n = N if scored is None else len(at)
        cand = flat[at].unsqueeze(1).repeat(1, C, 1).scatter_(2, slot[at].unsqueeze(2), module[at].unsqueeze(2))
        e, prev = model.embed(x).reshape(N, -1)[at], prev[at]
        if layer.compute_all:
            w_ih, b_ih, w_hh, b_hh = layer.stacked()
            new = layer.selected(F.linear(e, w_ih, b_ih), prev, cand, w_hh, b_hh)  # (n, C, H)
        else:
            new = torch.stack([layer.step(e, prev, cand[:, c]) for c in range(C)], 1)  # (n, C, H)
        y_at = y.reshape(N)[at]
        ll = model.token_log_likelihood(new.transpose(0, 1), y_at.view(1, n).expand(C, n), dtype=dtype)  # (C, n)
        if base_ll is None:
            base_ll = model.token_log_likelihood(hs, y, dtype=dtype)
        gain = (ll - base_ll.reshape(N)[at].view(1, n)).T  # (n, C)
        if prior_weight:
            lp = log_probs.reshape(N, K, M)[at]  # (n, K, M) the controller at each scored step
            s_at = slot[at]  # (n, C)
            now = lp.gather(2, flat[at].unsqueeze(2)).squeeze(2).gather(1, s_at)  # a*_t's module in the slot
            gain = gain + prior_weight * (lp.gather(1, s_at.unsqueeze(2).expand(-1, -1, M))  # (n, C, M)
                                          .gather(2, module[at].unsqueeze(2)).squeeze(2) - now)
        if scored is not None:
            gain = gain.new_zeros(N, C).index_copy_(0, at, gain)
        return WordGains(gain.reshape(shape), slot.reshape(shape), module.reshape(shape),
                         None if scored is None else scored.view(T, B))


def cap_of(load: torch.Tensor, capacity) -> float:
    """The most tokens a module may hold: ``capacity[2]`` times an even share of the load."""
    return capacity[2] * float(load.sum()) / load.numel()


def word_decide(table: torch.Tensor, gain: torch.Tensor, square: torch.Tensor, seen: torch.Tensor,
                words: torch.Tensor, bias: torch.Tensor | None = None, min_seen: int = WORD_MIN_SEEN,
                z: float = WORD_Z, capacity: tuple | None = None) -> torch.Tensor:
    """Move each word in ``words`` (V,) bool to its best-scoring one-slot change, in place.

    table (V, K); gain, square, seen (V, K, M): the sum and the sum of squares of the one-step
    gains of setting slot k to module m over the occurrences that scored it, and how many.
    A change scores its mean gain less ``z`` standard errors (+ bias[m] - bias[its slot's
    module]: the balancing bias per position); a word takes its best change when that is
    above 0 over at least ``min_seen`` occurrences. ``capacity``: (counts (V,) the words'
    training-text counts, load (M,) each module's tokens under the table (updated in place),
    factor): no move may take a module above factor x an even share. Returns the changed
    words (V,) bool."""
    M = gain.shape[2]
    n = seen.clamp(min=1)
    mean = gain / n
    score = mean - z * ((square / n - mean * mean).clamp(min=0) / n).sqrt()
    if bias is not None:
        score = score + bias.view(1, 1, M) - bias[table].unsqueeze(2)
    score = score.masked_fill((seen < min_seen) | ~words.view(-1, 1, 1), float("-inf"))
    best, where = score.flatten(1).max(1)  # (V,)
    change = best > 0
    if capacity is None:
        rows = change.nonzero(as_tuple=True)[0]
        table[rows, where[rows] // M] = where[rows] % M
        return change
    # BASE-style capacity: words move best gain first, each only into a module it keeps
    # within ``capacity`` tokens; leaving a module is always allowed.
    counts, load, _ = capacity
    order = torch.argsort(best.masked_fill(~change, float("-inf")), descending=True)[: int(change.sum())]
    change = torch.zeros_like(change)
    for w in order.tolist():
        room = load + counts[w] <= cap_of(load, capacity)
        row = score[w].masked_fill(~room.view(1, M), float("-inf")).flatten()
        top = int(row.argmax())
        if row[top] > 0:
            slot, m = divmod(top, M)
            load[table[w, slot]] -= counts[w]
            load[m] += counts[w]
            table[w, slot] = m
            change[w] = True
    return change


def m_step_loss(model: lm.ModularLM, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor,
                a_star: torch.Tensor) -> Losses:
    """``m_step_of`` one PTB window."""
    return m_step_of(model, Window(x, y, h, 0, 0, 0), a_star)


def m_step_of(model, w: Batch, a_star: torch.Tensor) -> Losses:
    """The M-step objective for one batch: -mean log p(y|x,a*) - mean log p(a*|x) (the
    second per position: per time step, or per modular layer)."""
    return m_step_scored(model, w, a_star)[0]


def m_step_scored(model, w: Batch, a_star: torch.Tensor) -> tuple[Losses, torch.Tensor]:
    """``m_step_of`` and the log p(y|x,a*) per position it came from (the word E-step's base)."""
    out, ll = model.run_scored(w.x, w.h, lm.given(a_star), w.y)
    return Losses(-ll.mean(), {"controller": -out.log_pa.mean()}, out), ll


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
        if tcfg.e_step in ("position", "word") and not recurrent:
            raise ValueError(f"the {tcfg.e_step} E-step walks a recurrent window of words; it has no meaning "
                             "for images")
        if (tcfg.a_star_init == "hash" or tcfg.e_step == "word") and (not recurrent or train_tokens is None):
            raise ValueError("the hash start keys a* on input words; images have none (use random)")
        self.memory = self.table = self.gain = self.square = self.seen = self.load = None
        if tcfg.e_step == "word":  # a* = table[x]: one entry per word, no memory per position
            if M == K:
                raise ValueError(f"the word E-step changes a word's modules; with M = K = {M} there is no other")
            V = mcfg.vocab_size
            self.counts = torch.bincount(train_tokens.flatten().cpu(), minlength=V).double()
            self.table = (balanced_table(self.counts, M, K) if tcfg.a_star_init == "hash"
                          else torch.rand(V, M).argsort(1)[:, :K])  # (V, K) distinct modules
            self.gain, self.square, self.seen = torch.zeros(V, K, M), torch.zeros(V, K, M), torch.zeros(V, K, M)
            self.keep = word_keep(self.counts, tcfg.word_subsample)
            self.stats_epoch = 0
        else:
            if tcfg.a_star_init == "hash":
                self.memory = hashed_memory(train_tokens, positions, M, K, mcfg.vocab_size)
            else:
                self.memory = torch.randint(0, M, (examples, positions, K), dtype=torch.int16)
            if self.memory.shape != (examples, positions, K):
                raise ValueError(f"a* memory {tuple(self.memory.shape)} != {(examples, positions, K)}")
        # a_star_init="controller": the examples whose a* the controller has not yet set.
        self.fresh = torch.ones(examples, dtype=torch.bool) if tcfg.a_star_init == "controller" else None
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
        if self.table is not None:
            a_star = self.table.to(dev)[w.x]  # (T, B, K)
        else:
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
            if tc.e_step == "word":
                # word_reuse: the M-step trains on the table as it stands and the window's
                # moves apply from the next window on; its forward is the E-step's trajectory
                # along a* when no dropout or lower precision makes the two differ. Else the
                # E-step runs first and the M-step trains the moved table.
                m = base = None
                if tc.word_reuse:
                    m, ll = m_step_scored(self.model, w, a_star)
                    lp = m.out.log_probs
                    if self.mcfg.dropout == 0 and dtype == torch.float32:
                        base = (m.out.hs.detach(), ll.detach(), None if lp is None else lp.detach())
                g = word_e_step(self.model, w.x, w.y, w.h, self.table.to(dev), tc.samples, dtype=dtype, keys=keys,
                                base=base, keep=self.keep, prior_weight=pw)
                changed = self.word_update(w, g)
                if m is None:
                    m = m_step_of(self.model, w, self.table.to(dev)[w.x])
                return m._replace(info={"e_changed": changed, "e_total": int(torch.unique(w.x).numel())})
            if self.fresh is not None:
                a_star = self.start_from_controller(w, a_star)
            if tc.e_step == "position":
                e = position_e_step(self.model, w.x, w.y, w.h, a_star, tc.samples, prior_weight=pw, dtype=dtype,
                                    bias=bias, keys=keys)
            else:
                e = e_step_of(self.model, w, a_star, tc.samples, prior_weight=pw, dtype=dtype, bias=bias, keys=keys)
                if tc.capacity:
                    pick = capped_pick(e.scores, e.candidates, self.memory_load().clone(), tc.capacity)
                    best = e.candidates[pick.to(dev), :, torch.arange(a_star.shape[1], device=dev)]  # (B, P, K)
                    e = e._replace(best=best.permute(1, 0, 2).contiguous(), changed=pick > 0)
            a_star = e.best
            # Every rank keeps the whole memory: the ranks exchange their rows' new a*.
            ids, new = self.world.cat_rows(w.ids, a_star.permute(1, 0, 2).to(torch.int16).cpu())  # (n, P, K)
            if self.fresh is not None:  # every rank's rows have had their start
                self.fresh[ids] = False
            if self.load is not None:  # the cap's counts follow the memory (every rank's rows)
                G, M = self.load.shape
                self.load += group_counts(new, G, M) - group_counts(self.memory[ids, :P], G, M)
            self.memory[ids, :P] = new
            if tc.balance_rate:
                self.rebalance(new.permute(1, 0, 2))
            info = {"e_changed": int(e.changed.sum()), "e_total": e.changed.numel()}
        return m_step_of(self.model, w, a_star)._replace(info=info)

    @torch.no_grad()
    def start_from_controller(self, w: Batch, a_star: torch.Tensor) -> torch.Tensor:
        """Set the a* of the batch's fresh examples to the controller's choice
        (``controller_start``) in the memory and return the batch's a* (P, B, K)."""
        fresh = self.fresh[w.ids]
        if not fresh.any():
            return a_star
        with scoring(self.model):
            out = self.model.run_examples(w.x, w.h, lm.greedy_policy())
        P = a_star.shape[0]
        cols = fresh.nonzero(as_tuple=True)[0].to(a_star.device)
        load = self.memory_load() if self.tcfg.capacity else None
        start = controller_start(out.log_probs[:, cols], a_star[:, cols], load, self.tcfg.capacity)
        a_star = a_star.clone()
        a_star[:, cols] = start
        # Every rank sets its own rows; the memory is exchanged with the E-step's result.
        ids = w.ids[fresh.cpu()]
        self.memory[ids, :P] = start.permute(1, 0, 2).to(torch.int16).cpu()
        self.fresh[ids] = False
        return a_star

    def memory_load(self) -> torch.Tensor:
        """Each group's module counts over the a* memory (G, M) float64 (``group_counts``),
        counted once and then kept up to date with every E-step's changes."""
        if self.load is None:
            groups = 1 if self.bias.dim() == 1 else self.bias.shape[0]
            self.load = group_counts(self.memory, groups, self.mcfg.modules)
        return self.load

    def rebalance(self, a_star: torch.Tensor) -> None:
        """Move the bias against each module's load in the new a* (P, B, K): over all
        positions for one layer, per layer's own row otherwise."""
        M = self.mcfg.modules
        if self.bias.dim() == 1:
            self.rebalance_load(torch.bincount(a_star.flatten(), minlength=M).float())
            return
        self.rebalance_load(torch.stack([torch.bincount(row.flatten(), minlength=M) for row in a_star]).float())

    def rebalance_load(self, load: torch.Tensor) -> None:
        """Move the bias (M,) or (L, M) against the load (same shape) of the new a*."""
        self.bias += self.tcfg.balance_rate * torch.sign(load.mean(-1, keepdim=True) - load)

    def word_update(self, w: Window, g: WordGains) -> int:
        """Add a window's one-step gains to the word statistics (summed over the ranks, so
        every rank changes the same entries), move the window's words whose best change
        gains (``word_decide``), and rebalance on the window's new a*. The statistics start
        again each epoch and for a word whenever its entry changes. Returns the words changed."""
        V, K, M = self.table.shape[0], self.mcfg.k, self.mcfg.modules
        stats = (self.gain, self.square, self.seen)
        if self.stats_epoch != w.epoch:
            for t in stats:
                t.zero_()
            self.stats_epoch = w.epoch
        x = w.x.cpu().unsqueeze(2)
        at = ((x * K + g.slot.cpu()) * M + g.module.cpu()).flatten()
        gains = g.gain.cpu().flatten().float()
        if g.scored is not None:  # the subsampled positions only
            pick = g.scored.cpu().unsqueeze(2).expand_as(g.gain).flatten()
            at, gains = at[pick], gains[pick]
        new = [torch.zeros(V * K * M).index_add_(0, at, v) for v in (gains, gains * gains, torch.ones_like(gains))]
        words = torch.zeros(V).index_fill_(0, w.x.cpu().flatten(), 1.0)
        for t in (*new, words):
            self.world.sum_(t)
        for t, d in zip(stats, new, strict=True):
            t += d.view(V, K, M)
        bias = self.bias if self.tcfg.balance_rate else None
        capacity = None
        if self.tcfg.capacity:
            load = torch.zeros(M, dtype=torch.double).index_add_(0, self.table.flatten(),
                                                                   self.counts.repeat_interleave(K))
            capacity = (self.counts, load, self.tcfg.capacity)
        change = word_decide(self.table, *stats, words > 0, bias, capacity=capacity)
        for t in stats:
            t[change] = 0.0
        if self.tcfg.balance_rate:
            self.rebalance_load(self.world.sum_(torch.bincount(self.table[w.x.cpu()].flatten(), minlength=M).float()))
        return int(change.sum())

    @torch.no_grad()
    def after_step(self, w: Batch, losses: Losses) -> None:
        # The dense phase's last optimiser step done: copy its modules now, so that an
        # evaluation or checkpoint at this boundary (the warm start's last epoch) sees
        # every module as the trained dense block rather than as its random start.
        if not self.upcycled and w.step + 1 >= self.tcfg.warm_start:
            self.upcycle()

    def upcycle(self) -> None:
        """Copy the dense phase's modules 0..K-1 into every module of each layer, plus noise of
        ``UPCYCLE_NOISE`` times each tensor's RMS (symmetry broken, function kept)."""
        K = self.mcfg.k
        g = torch.Generator().manual_seed(self.tcfg.seed)  # the same noise on every rank
        for mods in self.model.module_lists():
            for m in range(K, self.mcfg.modules):
                for p, src in zip(mods[m].parameters(), mods[m % K].parameters(), strict=True):
                    std = UPCYCLE_NOISE * float(src.detach().pow(2).mean().sqrt())
                    p.copy_(src + std * torch.randn(src.shape, generator=g).to(src.device))
                for b, src in zip(mods[m].buffers(), mods[m % K].buffers(), strict=True):
                    b.copy_(src)  # batch norm's running statistics
        self.upcycled = True

    def state(self) -> dict[str, Any]:
        s = {"memory": self.memory, "bias": self.bias, "upcycled": self.upcycled}
        if self.fresh is not None:
            s["fresh"] = self.fresh
        if self.table is not None:
            s.update(table=self.table, gain=self.gain, square=self.square, seen=self.seen,
                     stats_epoch=self.stats_epoch)
        return s

    def load_state(self, state: dict[str, Any]) -> None:
        self.memory, self.bias, self.upcycled = state["memory"], state["bias"], bool(state["upcycled"])
        self.load = None  # counted again from the restored memory
        if self.fresh is not None:
            self.fresh = state["fresh"]
        if self.table is not None:
            self.table, self.gain, self.square, self.seen = (state[k] for k in ("table", "gain", "square", "seen"))
            self.stats_epoch = int(state["stats_epoch"])
