"""The PTB modular language model (DESIGN.md §3, "The PTB model").

    tokens (T, B) -> embedding (T, B, E)
    for t in 1..T:                                   one modular GRU step
        scores  = controller([e_t; h_{t-1}])          (B, K, M) log-softmax per slot
        a_t     = policy(scores)                      (B, K) stored a*, a draw, or argmax
        h_t     = combine_{m in a_t} GRU_m(e_t, h_{t-1})
    hidden states (T, B, H) -> dropout -> head -> logits (T, B, V)

Selection is per time step; route -> run modules -> combine is ``ModularGRU.step``.
With ``method="dense"`` there is no controller: all M = K modules run at every step.
With ``method="noisy-topk"`` (Shazeer et al. 2017) the controller is a gating network: one
distribution over the M modules, Gaussian noise on its logits while training, the k
largest kept and their softmax weighting the module outputs (``combine="gate"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from modrt.train import routing
from modrt.train.config import ModelConfig

# Floats of logits ``token_log_likelihood`` computes at once: on CPU a chunk that stays in
# the core's cache (2 MB; measured: 48-row chunks of PTB's 10,000-word head 2-3x faster than
# one 90 MB block), elsewhere one bounded block (about 100 MB) per kernel launch.
CPU_LOGITS_FLOATS = 500_000
DEVICE_LOGITS_FLOATS = 25_000_000
# ModularGRU computes every module on every row (and masks) when M * H is at most this.
ALL_MODULES_MAX = 1024

# policy(t, log_probs (B, K, M)) -> selection (B, K)
Policy = Callable[[int, torch.Tensor], torch.Tensor]


class RecurrentOutput(NamedTuple):
    hs: torch.Tensor  # (T, B, H) hidden state after each step
    h_last: torch.Tensor  # (B, H)
    a: torch.Tensor  # (T, B, K) selections used
    log_pa: torch.Tensor  # (T, B) log p(a_t | x, h_{t-1}) summed over slots (0 when dense)
    log_probs: torch.Tensor | None  # (T, B, K, M) controller log-softmax (None when dense)
    # Noisy top-k only, summed over the window's steps: (M,) gate mass per module
    # (Importance) and (M,) probability of being in the top k (Load), for the balance losses.
    importance: torch.Tensor | None = None
    load: torch.Tensor | None = None


def given(a: torch.Tensor) -> Policy:
    """Follow fixed selections a (T, B, K): the M-step's a*."""
    return lambda t, lp: a[t]


def hashed(table: torch.Tensor, x: torch.Tensor) -> Policy:
    """Hash routing (Roller et al. 2021): row b at step t takes the modules table[x[t, b]]
    (table (V, K)), whatever the state; no controller."""
    a = table[x]  # (T, B, K)
    return lambda t, lp: a[t]


def greedy_policy() -> Policy:
    """Deterministic inference: the most probable module per slot."""
    return lambda t, lp: routing.greedy(lp)


def sample_policy(keep: torch.Tensor | None = None, generator: torch.Generator | None = None,
                  keys: torch.Tensor | None = None) -> Policy:
    """Draw from the controller; the first rows follow ``keep`` (T, B0, K) if given (E-step).
    ``keys`` (rows,) int64: row b's draw at position t comes from key (keys[b], t) alone
    (``routing.sample_keyed``), not from ``generator`` or torch's global state."""

    def policy(t: int, lp: torch.Tensor) -> torch.Tensor:
        a = routing.sample(lp, generator) if keys is None else routing.sample_keyed(lp, routing.key(keys, t))
        if keep is not None:
            a[: keep.shape[1]] = keep[t]
        return a

    return policy


class ModularGRU(nn.Module):
    """M GRU cells and a controller choosing K of them per row and per step."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E, H, M, K = cfg.embedding, cfg.hidden, cfg.modules, cfg.k
        self.cells = nn.ModuleList(nn.GRUCell(E, H) for _ in range(M))
        self.controller = self.noise = None
        if cfg.selection == "topk":
            # Shazeer et al.: W_g and W_noise start at zero (balanced gates, unit-ish noise).
            self.controller, self.noise = nn.Linear(E + H, M), nn.Linear(E + H, M)
            for lin in (self.controller, self.noise):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        elif cfg.routed and cfg.method != "hash":
            self.controller = nn.Linear(E + H, M * K)

    def scores(self, e_t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Controller log-probabilities. (B, E), (B, H) -> (B, K, M), or (B, 1, M) for the
        one gate distribution of noisy top-k."""
        B = e_t.shape[0]
        logits = self.controller(torch.cat([e_t, h], dim=1))  # (B, M*K) or (B, M)
        slots = 1 if self.cfg.selection == "topk" else self.cfg.k
        return F.log_softmax(logits.view(B, slots, self.cfg.modules), dim=-1)

    def gate(self, e_t: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Noisy top-k gating of [e_t; h] (``noisy_top_k``)."""
        xh = torch.cat([e_t, h], dim=1)
        return noisy_top_k(self.controller(xh), self.noise(xh) if self.training else None, self.cfg.k)

    @property
    def compute_all(self) -> bool:
        """Whether a step computes every module on every row and masks (one batched matmul
        per step) instead of dispatching rows to modules (M small matmuls). The values are
        the same; for small cells the per-module Python calls dominate (profiled at H=32:
        ``benchmarks/train_step_cost.py``), for large ones the M-fold arithmetic does."""
        return self.cfg.modules * self.cfg.hidden <= ALL_MODULES_MAX

    def stacked(self) -> tuple[torch.Tensor, ...]:
        """Every cell's weights side by side: W_ih (M*3H, E), b_ih, W_hh (M*3H, H), b_hh."""
        c = self.cells
        return (torch.cat([m.weight_ih for m in c]), torch.cat([m.bias_ih for m in c]),
                torch.cat([m.weight_hh for m in c]), torch.cat([m.bias_hh for m in c]))

    def all_states(self, gi_t: torch.Tensor, h: torch.Tensor, w_hh: torch.Tensor,
                   b_hh: torch.Tensor) -> torch.Tensor:
        """Every module's new state from the input projections gi_t (B, M*3H) (as
        ``GRUCell``: gates r, z, n). -> (B, M, H)."""
        B, H, M = h.shape[0], self.cfg.hidden, self.cfg.modules
        gi = gi_t.view(B, M, 3, H)
        gh = F.linear(h, w_hh, b_hh).view(B, M, 3, H)
        r = torch.sigmoid(gi[:, :, 0] + gh[:, :, 0])
        z = torch.sigmoid(gi[:, :, 1] + gh[:, :, 1])
        n = torch.tanh(gi[:, :, 2] + r * gh[:, :, 2])
        return n + z * (h.unsqueeze(1) - n)  # (1 - z) * n + z * h

    def selected(self, gi_t: torch.Tensor, h: torch.Tensor, a: torch.Tensor, w_hh: torch.Tensor,
                 b_hh: torch.Tensor) -> torch.Tensor:
        """The combined new state of selections a (B, ..., K) from every module's input
        projections gi_t (B, M*3H) and state h (B, H): ``all_states`` masked by ``mask``,
        with the gates computed for the K selected modules only. -> (B, ..., H).

        The hidden side is one matmul for all modules (cheap at small H); the gates' element
        work, which ``all_states`` does M times over (and autograd with it), runs K times
        (profiled at E=H=32, M=15: most of what an EM step cost beyond a dense one)."""
        B, H, M, K = h.shape[0], self.cfg.hidden, self.cfg.modules, a.shape[-1]
        rows = torch.arange(B, device=a.device).view(B, *([1] * (a.dim() - 1)))
        gi = gi_t.view(B, M, 3, H)[rows, a]  # (B, ..., K, 3, H)
        gh = F.linear(h, w_hh, b_hh).view(B, M, 3, H)[rows, a]
        r = torch.sigmoid(gi[..., 0, :] + gh[..., 0, :])
        z = torch.sigmoid(gi[..., 1, :] + gh[..., 1, :])
        n = torch.tanh(gi[..., 2, :] + r * gh[..., 2, :])
        states = n + z * (h.view(B, *([1] * (a.dim() - 1)), H) - n)  # (B, ..., K, H)
        if K == 1:
            return states.squeeze(-2)
        # A module in several slots counts once (as ``mask``): weight 1/its multiplicity,
        # and for the mean also 1/the number of distinct modules.
        mult = (a.unsqueeze(-1) == a.unsqueeze(-2)).sum(-1).to(states.dtype)  # (B, ..., K)
        w = 1.0 / mult
        if self.cfg.combine == "mean":
            w = w / w.sum(-1, keepdim=True)
        return (w.unsqueeze(-1) * states).sum(-2)

    def mask(self, a: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """The combine weights (B, M) of selection a (B, K): 1 (sum) or 1/distinct (mean)
        on each distinct selected module, or the gate weights."""
        if weights is not None:
            return weights
        m = torch.zeros(a.shape[0], self.cfg.modules, device=a.device).scatter_(1, a, 1.0)
        return m / m.sum(1, keepdim=True) if self.cfg.combine == "mean" else m

    def step(self, e_t: torch.Tensor, h: torch.Tensor, a: torch.Tensor,
             weights: torch.Tensor | None = None) -> torch.Tensor:
        """One routed step: group rows by module, run each used module once, combine.
        ``weights`` (B, M): scale module m's output for row b by weights[b, m] (gate)."""
        B = e_t.shape[0]
        d = routing.dispatch(a, self.cfg.modules)
        outs = []
        for m, cell in enumerate(self.cells):
            lo, hi = d.offsets[m], d.offsets[m + 1]
            if hi > lo:  # modules nobody selected cost nothing and get no gradient
                rows = d.rows[lo:hi]
                y = cell(e_t[rows], h[rows])  # (R_m, H)
                outs.append(y if weights is None else y * weights[rows, m].unsqueeze(1))
        return routing.combine(torch.cat(outs), d, B, self.cfg.combine)

    def forward(self, e: torch.Tensor, h: torch.Tensor, policy: Policy | None = None) -> RecurrentOutput:
        T, B, _ = e.shape
        K = self.cfg.k
        hs, sel, log_pa, lps = [], [], [], []
        if self.cfg.selection == "topk":  # noisy top-k: the gate decides; no policy
            importance = e.new_zeros(self.cfg.modules)
            load = e.new_zeros(self.cfg.modules)
            for t in range(T):
                a, w, lp, p_in = self.gate(e[t], h)
                h = self.step(e[t], h, a, w)
                importance = importance + w.sum(0)
                if p_in is not None:
                    load = load + p_in.sum(0)
                hs.append(h)
                sel.append(a)
                lps.append(lp)
            return RecurrentOutput(torch.stack(hs), h, torch.stack(sel), e.new_zeros(T, B),
                                   torch.stack(lps), importance, load)
        routed = self.controller is not None  # hash routing: no controller, the policy decides
        if not self.cfg.routed:
            a = torch.arange(K, device=e.device).expand(B, K)
        if self.compute_all:
            w_ih, b_ih, w_hh, b_hh = self.stacked()
            gi = F.linear(e, w_ih, b_ih)  # (T, B, M*3H): every module's input side at once
        for t in range(T):
            if routed:
                lp = self.scores(e[t], h)  # (B, K, M)
                a = policy(t, lp)  # (B, K)
                log_pa.append(routing.log_prob(lp, a))
                lps.append(lp)
            elif self.cfg.routed:  # hash routing: the policy reads the tokens, not the scores
                a = policy(t, None)
            if self.compute_all:
                h = self.selected(gi[t], h, a, w_hh, b_hh)
            else:
                h = self.step(e[t], h, a)
            hs.append(h)
            sel.append(a)
        hs_t = torch.stack(hs)  # (T, B, H)
        a_t = torch.stack(sel)  # (T, B, K)
        if routed:
            return RecurrentOutput(hs_t, h, a_t, torch.stack(log_pa), torch.stack(lps))
        return RecurrentOutput(hs_t, h, a_t, e.new_zeros(T, B), None)


def noisy_top_k(clean: torch.Tensor, noise: torch.Tensor | None, k: int) -> tuple[torch.Tensor, ...]:
    """Noisy top-k gating (Shazeer et al. 2017) of gate logits ``clean`` (B, M); ``noise``
    (B, M): the noise network's logits (training), None in eval mode (no noise). Returns
    a (B, k), gate weights (B, M) (zero off the top k), clean log-softmax (B, 1, M) and
    P(module in top k) (B, M) (None without noise or when k = M)."""
    M = clean.shape[1]
    noisy, std = clean, None
    if noise is not None:
        std = F.softplus(noise) + 1e-2
        noisy = clean + torch.randn_like(clean) * std
    # Stable descending sort, not topk: ties go to the lower module id, as ONNX TopK and
    # the runtime break them (a zero-initialised gate ties every module).
    top, a = torch.sort(noisy, dim=1, descending=True, stable=True)
    top, a = top[:, : k + 1], a[:, : k + 1]  # (B, k+1): the (k+1)-th is Load's threshold
    weights = torch.zeros_like(clean).scatter(1, a[:, :k], F.softmax(top[:, :k], dim=1))
    p_in = prob_in_top_k(clean, noisy, std, top, k) if std is not None and k < M else None
    return a[:, :k], weights, F.log_softmax(clean, dim=1).unsqueeze(1), p_in


def prob_in_top_k(clean: torch.Tensor, noisy: torch.Tensor, std: torch.Tensor, top: torch.Tensor,
                  k: int) -> torch.Tensor:
    """P(module m is in the top k when only its own noise is redrawn) (Shazeer et al. 2017,
    the smooth estimator behind the load loss). A module inside the top k must beat the
    (k+1)-th largest noisy logit, one outside the k-th. (B, M) each, top (B, >k+1) -> (B, M)."""
    normal = torch.distributions.Normal(clean.new_zeros(()), clean.new_ones(()))
    thr_in = top[:, k : k + 1]  # (B, 1)
    thr_out = top[:, k - 1 : k]
    is_in = noisy > thr_in
    p_if_in = normal.cdf((clean - thr_in) / std)
    p_if_out = normal.cdf((clean - thr_out) / std)
    return torch.where(is_in, p_if_in, p_if_out)


class ModularLM(nn.Module):
    """Embedding -> modular GRU layer -> linear head over the vocabulary."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embedding)
        self.layer = ModularGRU(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        if cfg.method == "hash":  # filled from the training text's word counts (methods.hash)
            self.register_buffer("hash_table", torch.arange(cfg.vocab_size * cfg.k).view(-1, cfg.k) % cfg.modules)

    def init_hidden(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.zeros(batch, self.cfg.hidden, device=device)

    def forward(self, x: torch.Tensor, h: torch.Tensor, policy: Policy | None = None) -> RecurrentOutput:
        """Run the recurrence over tokens x (T, B) from state h (B, H); no head."""
        e = self.drop(self.embed(x))  # (T, B, E)
        if self.cfg.method == "hash":
            policy = hashed(self.hash_table, x)
        return self.layer(e, h, policy)

    # The training methods' view of a model (``modrt.train.methods``), the same for the image
    # network (``modrt.train.conv``): examples in, per-position selections and log p(y) out.
    def run_examples(self, x: torch.Tensor, h: torch.Tensor, policy: Policy | None = None,
                     repeat: int = 1) -> RecurrentOutput:
        """``forward`` over ``repeat`` copies of the batch side by side (copy s owns columns
        s*B .. s*B+B-1: the E-step's candidates)."""
        if repeat > 1:
            x, h = x.repeat(1, repeat), h.repeat(repeat, 1)
        return self(x, h, policy)

    def example_log_likelihood(self, out: RecurrentOutput, y: torch.Tensor, repeat: int = 1,
                               dtype: torch.dtype | None = None) -> torch.Tensor:
        """log p(y_t | ...) per token of ``run_examples``' output: (T, repeat*B)."""
        return self.token_log_likelihood(out.hs, y.repeat(1, repeat) if repeat > 1 else y, dtype=dtype)

    def run_scored(self, x: torch.Tensor, h: torch.Tensor, policy: Policy | None,
                   y: torch.Tensor) -> tuple[RecurrentOutput, torch.Tensor]:
        """A training step's forward with gradient: (``run_examples``' output, its
        ``example_log_likelihood``). Every method's loss comes from this one call, which
        ``distributed.wrap`` sends through DistributedDataParallel on several processes."""
        out = self.run_examples(x, h, policy)
        return out, self.example_log_likelihood(out, y)

    def module_lists(self) -> list[nn.ModuleList]:
        """Each modular layer's M modules (EM's warm start copies among them)."""
        return [self.layer.cells]

    def logits(self, hs: torch.Tensor) -> torch.Tensor:
        """(T, B, H) -> (T, B, V)."""
        return self.head(self.drop(hs))

    def token_log_likelihood(self, hs: torch.Tensor, y: torch.Tensor, rows: int | None = None,
                             dtype: torch.dtype | None = None) -> torch.Tensor:
        """log p(y_t | ...) per token, with or without gradient. (T, B, H), (T, B) -> (T, B).

        The head and its softmax run ``rows`` rows of the flattened (T*B, H) at a time
        (default ``head_rows()``: on CPU as many as keep one chunk's logits within
        ``CPU_LOGITS_FLOATS``). ``dtype`` (e.g. bfloat16): the head's matmul in that
        precision, bias and softmax in float32 - for scoring without gradient (the E-step).

        At H = 32 the head is most of a step (profiled with py-spy: 75% of the position
        E-step, 50% of a dense step), and it is bound by memory, not arithmetic: 2240 rows
        x 10,000 words of logits at once (90 MB) ran 3.0x slower without gradient and 2.3x
        with it than 48-row chunks that stay in the core's cache (same numbers)."""
        head = self.logits
        if dtype is not None and dtype != self.head.weight.dtype:
            w = self.head.weight.to(dtype)

            def head(h: torch.Tensor) -> torch.Tensor:
                return F.linear(self.drop(h).to(dtype), w).float().add_(self.head.bias)

        flat_h, flat_y = hs.flatten(0, -2), y.flatten()
        rows = rows or self.head_rows(hs.device)
        out = [-F.cross_entropy(head(flat_h[lo : lo + rows]), flat_y[lo : lo + rows], reduction="none")
               for lo in range(0, flat_y.numel(), rows)]
        return torch.cat(out).view_as(y)

    def head_rows(self, device: torch.device) -> int:
        """Rows of logits ``token_log_likelihood`` computes at once on ``device``."""
        floats = CPU_LOGITS_FLOATS if device.type == "cpu" else DEVICE_LOGITS_FLOATS
        return max(1, floats // self.cfg.vocab_size)
