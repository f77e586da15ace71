"""The CIFAR-10 modular convolutional network (``ImageModelConfig``).

    image (B, 3, 32, 32), normalised per channel
    for each modular layer l:
        scores_l = controller_l(average pool of x)            (B, K, M) log-softmax per slot
        a_l      = policy(l, scores_l)                         (B, K) stored a*, a draw, argmax
        x        = combine_{m in a_l} block_m(x)               block: 3x3 conv -> BN -> ReLU
        x        = max_pool_2x2(x)
    global average pool (B, C) -> linear head -> logits (B, classes)

Selection is per image and per layer. The policies of the recurrent model
(``modrt.train.model``: ``given``, ``greedy_policy``, ``sample_policy``) apply unchanged,
with the layer index where the recurrent model has the time step: a selection of the whole
network is (L, B, K), as a recurrent one is (T, B, K). Only the selected modules compute,
on just their rows (``routing.dispatch``); a module repeated in two slots counts once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from modrt.train import routing
from modrt.train.config import ImageModelConfig
from modrt.train.model import ModularLM, Policy, noisy_top_k


class ImageOutput(NamedTuple):
    logits: torch.Tensor  # (B, classes)
    a: torch.Tensor  # (L, B, K) selections used
    log_pa: torch.Tensor  # (L, B) log p(a_l | x) summed over slots (0 when dense)
    log_probs: torch.Tensor | None  # (L, B, K, M) controllers' log-softmax (None when dense)
    # Noisy top-k only: (L, M) gate mass per module (Importance) and P(in the top k) (Load)
    # of each layer, summed over the batch, for the balance losses.
    importance: torch.Tensor | None = None
    load: torch.Tensor | None = None


def conv_block(cin: int, cout: int) -> nn.Sequential:
    """One module: 3x3 conv (no bias: the norm has one) -> batch norm -> ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def max_pool(x: torch.Tensor) -> torch.Tensor:
    """2x2 max pool (stride 2, odd edges dropped), as ``F.max_pool2d(x, 2)``. Without
    autograd it is the elementwise max of the four strided views: the same numbers, ~2x
    faster on CPU than max_pool2d, which also writes an int64 index per output (measured on
    (512, 64, 32, 32), one thread; the E-step and evaluation run here)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return F.max_pool2d(x, 2)
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    return torch.maximum(torch.maximum(x[..., 0:h:2, 0:w:2], x[..., 0:h:2, 1:w:2]),
                         torch.maximum(x[..., 1:h:2, 0:w:2], x[..., 1:h:2, 1:w:2]))


class ModularConv(nn.Module):
    """M conv blocks and a controller choosing K of them per image. ``selection="topk"``
    (noisy top-k): the controller is a gating network, one distribution over the M modules
    with learned noise while training; its k largest are kept and weight the outputs."""

    def __init__(self, cin: int, cout: int, modules: int, k: int, combine: str, routed: bool = True,
                 selection: str = "slots", pool: int = 1):
        super().__init__()
        self.modules_, self.k, self.combine, self.selection, self.pool = modules, k, combine, selection, pool
        self.blocks = nn.ModuleList(conv_block(cin, cout) for _ in range(modules))
        self.controller = self.noise = None
        features = cin * pool * pool
        if routed and selection == "topk":
            # Shazeer et al.: W_g and W_noise start at zero (balanced gates, unit-ish noise).
            self.controller, self.noise = nn.Linear(features, modules), nn.Linear(features, modules)
            for lin in (self.controller, self.noise):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        elif routed:
            self.controller = nn.Linear(features, modules * k)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The controller's input: the block's input average-pooled to a pool x pool grid
        (pool 1: the global average pool), flattened. (B, C, H, W) -> (B, C * pool^2)."""
        if self.pool == 1:
            return x.mean(dim=(2, 3))
        s = x.shape[-1] // self.pool  # the config checks that pool divides the side
        return F.avg_pool2d(x, s).flatten(1)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Controller log-probabilities from the pooled input (``pooled``). (B, C, H, W) -> (B, K, M),
        or (B, 1, M) for noisy top-k's one gate distribution."""
        slots = 1 if self.selection == "topk" else self.k
        logits = self.controller(self.pooled(x))
        return F.log_softmax(logits.view(x.shape[0], slots, self.modules_), dim=-1)

    def gate(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Noisy top-k gating of the pooled input (``model.noisy_top_k``)."""
        p = self.pooled(x)
        return noisy_top_k(self.controller(p), self.noise(p) if self.training else None, self.k)

    def forward(self, x: torch.Tensor, a: torch.Tensor, weights: torch.Tensor | None = None,
                pool: bool = False) -> torch.Tensor:
        """The selected blocks on their rows, combined. x (B, C, H, W), a (B, K) -> (B, C', H, W),
        or (B, C', H/2, W/2) with ``pool`` (the 2x2 max pool after the layer); ``weights``
        (B, M): module m's output for row b scaled by weights[b, m] (gate).

        Where every row uses one module (K = 1, or its slots agree) the pool, a per-row op,
        runs on each module's output before the combine: the same numbers, a quarter of the
        feature map to put back in batch order. A module that serves every row takes the
        batch as it is (no gather), and then there is nothing to combine (dense: always)."""
        B, M = x.shape[0], self.modules_
        d = routing.dispatch(a, M)
        single = d.rows.shape[0] == B  # every row uses one module
        early = pool and single
        parts = []
        for m in range(M):
            lo, hi = d.offsets[m], d.offsets[m + 1]
            if hi > lo:
                rows = d.rows[lo:hi]
                y = self.blocks[m](x if hi - lo == B else x[rows])  # a group of B rows is 0..B-1
                if weights is not None:
                    y = y * weights[rows, m].view(-1, 1, 1, 1)
                parts.append(max_pool(y) if early else y)
        if len(parts) == 1 and single:  # one module on every row, in row order
            y = parts[0]
        else:
            y = routing.combine(torch.cat(parts) if len(parts) > 1 else parts[0], d, B, self.combine)
        return max_pool(y) if pool and not early else y


class ModularConvNet(nn.Module):
    """Modular conv layers with 2x2 max pooling between them and a linear head."""

    def __init__(self, cfg: ImageModelConfig):
        super().__init__()
        self.cfg = cfg
        cin, layers = cfg.in_channels, []
        for c in cfg.channels:
            layers.append(ModularConv(cin, c, cfg.modules, cfg.k, cfg.combine, routed=cfg.routed,
                                      selection=cfg.selection, pool=cfg.controller_pool))
            cin = c
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(cin, cfg.classes)
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, -1, 1, 1), persistent=False)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) pixels -> the network's input, float (B, 3, H, W) normalised."""
        x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor, policy: Policy | None = None) -> ImageOutput:
        """x (B, 3, H, W) normalised -> logits and the selections ``policy`` made per layer
        (noisy top-k: its gates decide, no policy; dense: every module, no policy)."""
        B, K = x.shape[0], self.cfg.k
        topk = self.cfg.selection == "topk"
        a_all, lpa, lps, imp, load = [], [], [], [], []
        for li, layer in enumerate(self.layers):
            w = None
            if layer.controller is None:  # dense: every module on every row
                a = torch.arange(K, device=x.device).expand(B, K)
                lpa.append(x.new_zeros(B))
            elif topk:
                a, w, lp, p_in = layer.gate(x)
                lps.append(lp)
                lpa.append(x.new_zeros(B))
                imp.append(w.sum(0))
                load.append(p_in.sum(0) if p_in is not None else x.new_zeros(self.cfg.modules))
            else:
                lp = layer.scores(x)
                a = policy(li, lp)
                lps.append(lp)
                lpa.append(routing.log_prob(lp, a))
            a_all.append(a)
            x = layer(x, a, w, pool=True)
        logits = self.head(x.mean(dim=(2, 3)))
        return ImageOutput(logits, torch.stack(a_all), torch.stack(lpa), torch.stack(lps) if lps else None,
                           torch.stack(imp) if topk else None, torch.stack(load) if topk else None)

    def log_likelihood(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log p(y | x, a) per image. (B, classes), (B,) -> (B,)."""
        return -F.cross_entropy(logits, y, reduction="none")

    # The training methods' view of a model, as ``ModularLM``'s: a selection of the whole
    # network is (L, B, K), positions are layers; one image has one log p(y | x, a).
    def run_examples(self, x: torch.Tensor, h: None = None, policy: Policy | None = None,
                     repeat: int = 1) -> ImageOutput:
        """``forward`` over ``repeat`` copies of the batch (copy s owns rows s*B .. s*B+B-1);
        ``h`` is the recurrent model's state and must be None here. In eval mode (the
        E-step's scoring) the copies share their work: ``_shared``."""
        if repeat == 1:
            return self(x, policy)
        if self.training or self.cfg.selection != "slots" or not self.cfg.routed:
            return self(x.repeat(repeat, 1, 1, 1), policy)
        return self._shared(x, policy, repeat)

    def _shared(self, x: torch.Tensor, policy: Policy, repeat: int) -> ImageOutput:
        """``forward`` over ``repeat`` copies of the batch, each distinct (image, modules so
        far) computed once. In eval mode a row's feature maps depend on its image and the
        path it took alone (batch norm uses its running statistics), and the E-step's
        candidates mostly share their paths: the stored a* and draws from the controller,
        which decides more as training goes on. Per layer the controller runs on the
        distinct rows; the policy then picks for every row (its keyed draws need them all),
        and the rows that now share (image, path) share the layer's output."""
        B = x.shape[0]
        inv = torch.arange(B, device=x.device).repeat(repeat)  # row -> its feature map in xs
        xs = x
        a_all, lpa, lps = [], [], []
        for li, layer in enumerate(self.layers):
            lp = layer.scores(xs)[inv]  # (N, K, M)
            a = policy(li, lp)
            a_all.append(a)
            lps.append(lp)
            lpa.append(routing.log_prob(lp, a))
            paths, inv = torch.unique(torch.cat([inv[:, None], a], 1), dim=0, return_inverse=True)
            xs = layer(xs[paths[:, 0]], paths[:, 1:], pool=True)
        logits = self.head(xs.mean(dim=(2, 3)))[inv]
        return ImageOutput(logits, torch.stack(a_all), torch.stack(lpa), torch.stack(lps))

    def example_log_likelihood(self, out: ImageOutput, y: torch.Tensor, repeat: int = 1,
                               dtype: torch.dtype | None = None) -> torch.Tensor:
        """log p(y | x, a) per image of ``run_examples``' output: (1, repeat*B). ``dtype`` is
        the recurrent model's head precision and has no meaning here (the head is tiny)."""
        return self.log_likelihood(out.logits, y.repeat(repeat) if repeat > 1 else y).unsqueeze(0)

    run_scored = ModularLM.run_scored  # (output, log p(y | x, a) (1, B)): the training step's forward

    def module_lists(self) -> list[nn.ModuleList]:
        return [layer.blocks for layer in self.layers]


__all__ = ["ImageOutput", "ModularConv", "ModularConvNet", "conv_block", "max_pool"]
