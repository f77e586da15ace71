"""The dense baseline: M = K modules, all used at every step; no controller."""

from __future__ import annotations

from modrt.train.methods.base import Losses, Method, Window, nll_of


class Dense(Method):
    name = "dense"

    def losses(self, w: Window) -> Losses:
        out = self.model(w.x, w.h)
        return Losses(nll_of(self.model, out, w.y), {}, out)
