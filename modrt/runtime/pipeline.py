"""One pipeline for every topology: the stages before the first modular layer, the modular
layers in sequence with the graphs between them (glue), the stages after.

    feed-forward   x -> pre -> layer / glue / layer ... -> post -> y;   modules (B, L, K)
    recurrent      tokens -> pre (embedding) -> (T, B, E)
                   -> each layer over the whole window (``Layer.window``) in turn
                   -> (B, T, H) -> post (head) -> logits;            modules (B, T, L, K)

A stacked recurrent network runs layer by layer over the window, not step by step across
layers: layer l+1 at step t reads only layer l's state at t, so the order gives the same
numbers and lets a layer run a window in one call (``graph-loop``). Callers pass the layers
to run (``Model.run``: each chosen for the batch size; ``run_dense``: the dense graphs;
the benchmark's bound peer: its own), so routed, dense, measured and benchmarked runs all
go through this one driver.
"""

from __future__ import annotations

import numpy as np

from modrt._exceptions import BundleError
from modrt.bundle import Manifest
from modrt.runtime.layer import Layer
from modrt.runtime.sessions import Graph, Sessions


class Pipeline:
    """A bundle's stages, bound to their sessions; the layers are given per call."""

    def __init__(self, manifest: Manifest, sessions: Sessions):
        m = manifest
        names = {l.name for l in m.layers}
        self.layer_names = [s for s in m.stages if s in names]  # the order they run in
        first = next(i for i, s in enumerate(m.stages) if s in names)
        last = max(i for i, s in enumerate(m.stages) if s in names)
        self.pre: list[Graph] = [sessions[s] for s in m.stages[:first]]
        # Between the first and the last modular layer: a layer's name, or a glue graph.
        self.mid: list[str | Graph] = [s if s in names else sessions[s] for s in m.stages[first:last + 1]]
        self.post: list[Graph] = [sessions[s] for s in m.stages[last + 1:]]
        self.recurrent = m.topology == "recurrent"
        if self.recurrent and any(isinstance(s, Graph) for s in self.mid):
            raise BundleError("a recurrent bundle with graphs between its modular layers is not supported")
        self.K = max(l.k for l in m.layers)
        # One modular layer and nothing around it: run() calls it directly.
        self.single = not self.recurrent and not self.pre and not self.post and len(self.mid) == 1

    def feedforward(self, layers: list[Layer], x: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
        """x (B, ...) fed as ``name`` -> (last output, modules (B, L, K) int32); ``layers``
        in the bundle's order."""
        if self.single:
            y, a = layers[0]({name: x})
            return y, a.astype(np.int32, copy=False)[:, None]
        cur = x
        for g in self.pre:
            cur = g({g.input_names[0]: cur})[0]
        modules = np.empty((x.shape[0], len(layers), self.K), np.int32)
        li = 0
        for stage in self.mid:
            if isinstance(stage, Graph):
                cur = stage({stage.input_names[0]: cur})[0]
            else:
                layer = layers[li]
                cur, modules[:, li] = layer({layer.inputs[0]: cur})
                li += 1
        for g in self.post:
            cur = g({g.input_names[0]: cur})[0]
        return cur, modules

    def run_recurrent(self, layers: list[Layer], tokens: np.ndarray, h0: list[np.ndarray]
                      ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """tokens (B, T) -> (last output, modules (B, T, L, K) int32, h_last per layer)."""
        cur = tokens
        for g in self.pre:
            cur = g({g.input_names[0]: cur})[0]
        x_tm = np.ascontiguousarray(np.swapaxes(cur, 0, 1))  # (T, B, E): step t is contiguous
        sels, h_last = [], []
        for layer, h in zip(layers, h0, strict=True):
            x_tm, sel, h = layer.window(x_tm, h)
            sels.append(sel)
            h_last.append(h)
        cur = np.ascontiguousarray(np.swapaxes(x_tm, 0, 1))  # (B, T, H)
        for g in self.post:
            cur = g({g.input_names[0]: cur})[0]
        sel = sels[0][:, :, None] if len(sels) == 1 else np.stack(sels, 2)  # (T, B, L, K)
        return cur, np.ascontiguousarray(sel.transpose(1, 0, 2, 3)), h_last


__all__ = ["Pipeline"]
