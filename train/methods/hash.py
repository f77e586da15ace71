"""Hash routing (Roller et al., "Hash Layers For Large Sparse Models", NeurIPS 2021): each
word always goes to the same K modules, a fixed table chosen before training so that every
module gets about the same share of the training text (words by falling frequency, each to
the K least-loaded modules so far). No controller, nothing learned about routing: if a
hash-routed layer cannot beat dense at equal compute, a learned router is unlikely to.
"""

from __future__ import annotations

import heapq

import torch

from modrt.train.methods.base import Losses, Method, Window


def balanced_table(counts: torch.Tensor, modules: int, k: int) -> torch.Tensor:
    """(V,) word counts -> (V, K) distinct module ids; greedy least-loaded by frequency.
    Ties go to the lower module id, so the table is deterministic."""
    heap = [(0, m) for m in range(modules)]
    table = torch.zeros(counts.numel(), k, dtype=torch.long)
    for word in torch.argsort(counts, descending=True, stable=True).tolist():
        picked = [heapq.heappop(heap) for _ in range(k)]
        for slot, (load, m) in enumerate(picked):
            table[word, slot] = m
            heapq.heappush(heap, (load + int(counts[word]), m))
    return table


def table_of(tokens: torch.Tensor, vocab: int, modules: int, k: int) -> torch.Tensor:
    """The balanced table (V, K) for a training text (any shape of token ids)."""
    return balanced_table(torch.bincount(tokens.flatten().cpu(), minlength=vocab), modules, k)


class Hash(Method):
    name = "hash"

    def __init__(self, model, mcfg, tcfg, examples, positions, train_tokens: torch.Tensor | None = None):
        super().__init__(model, mcfg, tcfg, examples, positions)
        if train_tokens is not None:
            model.hash_table.copy_(table_of(train_tokens, mcfg.vocab_size, mcfg.modules, mcfg.k))

    def losses(self, w: Window) -> Losses:
        out, ll = self.model.run_scored(w.x, w.h, None, w.y)
        return Losses(-ll.mean(), {}, out)
