"""The dense baseline: M = K modules, all used at every step; no controller."""

from __future__ import annotations

from modrt.train.methods.base import Batch, Losses, Method, nll_of


class Dense(Method):
    name = "dense"

    def losses(self, w: Batch) -> Losses:
        out = self.model.run_examples(w.x, w.h)
        return Losses(nll_of(self.model, out, w.y), {}, out)
