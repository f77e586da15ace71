"""The dense baseline: M = K modules, all used at every step; no controller."""

from __future__ import annotations

from modrt.train.methods.base import Batch, Losses, Method


class Dense(Method):
    name = "dense"

    def losses(self, w: Batch) -> Losses:
        out, ll = self.model.run_scored(w.x, w.h, None, w.y)
        return Losses(-ll.mean(), {}, out)
