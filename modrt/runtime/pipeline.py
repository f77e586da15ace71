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

HEAD_CHUNK_BYTES = 32 * 2**20  # the most output of the stages after a recurrent layer held at once


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
        # Elements per row and time step of the last stage's output (the vocabulary), or -1.
        self._head_width = int(self.post[-1].spec.outputs[0].shape[-1]) if self.post else -1
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

    def run_recurrent(self, layers: list[Layer], tokens: np.ndarray, h0: list[np.ndarray], head: str = "all"
                      ) -> tuple[np.ndarray | None, np.ndarray, list[np.ndarray]]:
        """tokens (B, T) -> (last output, modules (B, T, L, K) int32, h_last per layer).

        ``head``: "all" gives the stages after the layers' output (the logits, (B, T, V));
        "argmax" its argmax over the last axis (B, T) int64, taken over chunks of time steps
        so that no more than ``HEAD_CHUNK_BYTES`` of logits exist at once; "none" runs no
        stage after the layers (None). The head runs over chunks in every mode: each time
        step is independent there, and a long request then never grows ONNX Runtime's
        memory arena by its whole (B, T, V) output."""
        cur = tokens
        for g in self.pre:
            cur = g({g.input_names[0]: cur})[0]
        x_tm = np.ascontiguousarray(np.swapaxes(cur, 0, 1))  # (T, B, E): step t is contiguous
        sels, h_last = [], []
        for layer, h in zip(layers, h0, strict=True):
            x_tm, sel, h = layer.window(x_tm, h)
            sels.append(sel)
            h_last.append(h)
        sel = sels[0][:, :, None] if len(sels) == 1 else np.stack(sels, 2)  # (T, B, L, K)
        modules = np.ascontiguousarray(sel.transpose(1, 0, 2, 3))
        if head == "none" or not self.post:
            return (None if head == "none" else np.ascontiguousarray(np.swapaxes(x_tm, 0, 1))), modules, h_last
        return self._head(x_tm, head == "argmax"), modules, h_last

    def _head(self, x_tm: np.ndarray, argmax: bool) -> np.ndarray:
        """The stages after the layers over the time-major states (T, B, H), in chunks of
        time steps: (B, T, V), or its argmax (B, T)."""
        T, B = x_tm.shape[:2]
        width = self._head_width
        step = max(1, HEAD_CHUNK_BYTES // max(1, B * width * 4)) if width > 0 else T
        if step >= T:  # one call: the common case (a window of a few dozen steps)
            cur = self._after(x_tm)
            return cur.argmax(-1) if argmax else cur
        out = None
        for t in range(0, T, step):
            cur = self._after(x_tm[t:t + step])  # (B, c, V)
            if out is None:
                out = np.empty((B, T) if argmax else (B, T, *cur.shape[2:]), np.int64 if argmax else cur.dtype)
            out[:, t:t + cur.shape[1]] = cur.argmax(-1) if argmax else cur
        return out

    def _after(self, x_tm: np.ndarray) -> np.ndarray:
        """The stages after the layers on time-major states (c, B, H) -> (B, c, ...)."""
        cur = np.ascontiguousarray(np.swapaxes(x_tm, 0, 1))
        for g in self.post:
            cur = g({g.input_names[0]: cur})[0]
        return cur


__all__ = ["Pipeline"]
