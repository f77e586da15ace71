"""The layer contract: what every strategy's modular layer is (host, graph, graph-loop,
fused, the dense baseline, the benchmark's bound), so that one ``Pipeline`` drives them all.

    layer(feeds, out=None) -> (y (B, D), a (B, K))     one step: feeds are the controller's
                                                        inputs by name, (x) or (e, h)
    layer.window(x_tm, h0, hs=None) -> (hs (T, B, H), sel (T, B, K) int32, h_last (B, H))
                                                        a recurrent layer over a window

``window`` is the one place a step layer is driven through time (``Layer.window``); a
strategy that runs a whole window in one call (``graph-loop``'s ONNX Loop) overrides it.
"""

from __future__ import annotations

import numpy as np

from modrt.bundle import LayerSpec


class Layer:
    """Base of every modular layer. Subclasses set ``spec``, ``inputs`` (the step's feed
    names, in the controller's order) and ``kind``, and implement ``__call__``."""

    spec: LayerSpec
    inputs: list[str]
    kind: str = "layer"

    def __call__(self, feeds: dict[str, np.ndarray], out: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def window(self, x_tm: np.ndarray, h0: np.ndarray, hs: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The layer over T steps from state h0: step t's state is written to ``hs[t]``
        (allocated when None) and is step t+1's state input."""
        T, B = x_tm.shape[:2]
        state = self.spec.state
        x = next(n for n in self.inputs if n != state)
        if hs is None:
            hs = np.empty((T, *h0.shape), h0.dtype)
        sel = np.empty((T, B, self.spec.k), np.int32)
        h = h0
        for t in range(T):
            h, sel[t] = self({x: x_tm[t], state: h}, out=hs[t])
        return hs, sel, h


__all__ = ["Layer"]
