"""The ``host`` strategy (DESIGN.md §6): a modular layer run in numpy over per-module
sessions. Per layer and step:

    1. route     controller on the batch, greedy top-K per slot (or the
                 k most probable of one distribution, selection "topk")   (B, K)
    2. dispatch  rows grouped by module (argsort + offsets); each module
                 with rows runs once, on just its rows (one gather)        (R, ...)
    3. combine   module outputs back in batch order, sum/mean/gate         (B, D)

Modules nobody selected cost nothing. Buffers for the gathered inputs and the routed
outputs are kept per thread and grown, never shrunk, so a steady batch size allocates
nothing in numpy. ``DenseLayer`` runs the layer's dense baseline graph on the same
feeds instead, for the row-for-row comparison. Both are ``Layer``s (``layer.py``): the
``Pipeline`` drives them, through time too.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np

from modrt import routing
from modrt._exceptions import BundleError
from modrt.bundle import LayerSpec
from modrt.runtime.layer import Layer
from modrt.runtime.sessions import Graph


class _Workspace(threading.local):
    """Per-thread grow-only buffers: name -> array with at least the rows asked for."""

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, rows: int, tail: tuple[int, ...], dtype) -> np.ndarray:
        buf = self.buffers.get(name)
        if buf is None or buf.shape[0] < rows:
            buf = np.empty((max(rows, 2 * (0 if buf is None else buf.shape[0])), *tail), dtype)
            self.buffers[name] = buf
        return buf[:rows]


class HostLayer(Layer):
    """One modular layer: ``layer(feeds) -> (out (B, D_out), a (B, K) int64)``; the
    features may have any static shape (a conv module's (C, H, W) feature maps)."""

    kind = "host"

    def __init__(self, spec: LayerSpec, graphs: Mapping[str, Graph]):
        self.spec = spec
        self.controller = graphs[spec.controller]
        self.modules = [graphs[g] for g in spec.module_graphs]
        self.inputs = list(self.controller.input_names)  # (x) or (e, h)
        self.module_inputs = list(self.modules[0].input_names)
        out = self.modules[0].spec.outputs[0]
        self.out_dim = out.shape[-1]
        self.out_tail = tuple(out.shape[1:])  # (D,), or a feature map's (C, H, W)
        self.out_dtype = np.dtype(out.dtype)  # manifest dtypes are numpy names
        self._tails = {t.name: (tuple(t.shape[1:]), np.dtype(t.dtype))
                       for t in self.modules[0].spec.inputs}
        self._ws = _Workspace()

    def __call__(
        self, feeds: dict[str, np.ndarray], out: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        lp = self.controller(feeds)[0]  # (B, K, M), or (B, 1, M) for "topk"
        spec = self.spec
        a = routing.greedy(lp) if spec.selection == "slots" else routing.top_k(lp, spec.k)  # (B, K)
        w = routing.gates(lp, a) if spec.combine == "gate" else None  # (B, K)
        B = a.shape[0]
        if B == 1:  # one row: every selected module takes the inputs as they are
            return self._one_row(feeds, a, w, out), a
        d = routing.dispatch(a, self.spec.modules)
        R = d.rows.shape[0]
        ws = self._ws
        gathered = {}
        for name in self.module_inputs:  # one gather per input for all modules: (R, ...)
            tail, dtype = self._tails[name]
            buf = ws.get(name, R, tail, dtype)
            gathered[name] = np.take(feeds[name], d.rows, axis=0, out=buf, mode="clip")
        y = ws.get("_y", R + 1, self.out_tail, self.out_dtype)  # +1: combine's zero pad row
        off = d.offsets
        single = self.module_inputs[0] if len(self.module_inputs) == 1 else None
        for m, module in enumerate(self.modules):
            lo, hi = off[m], off[m + 1]
            if hi > lo:
                if single is not None:
                    res = module({single: gathered[single][lo:hi]})
                else:
                    res = module({n: g[lo:hi] for n, g in gathered.items()})
                y[lo:hi] = res[0]
        if out is None:
            out = np.empty((B, *self.out_tail), self.out_dtype)
        routing.combine(y, d, B, self.spec.combine, out=out, weights=w)
        return out, a

    def _one_row(self, feeds: dict[str, np.ndarray], a: np.ndarray, w: np.ndarray | None,
                 out: np.ndarray | None) -> np.ndarray:
        """Batch 1, the latency case: no dispatch, gather or scatter arrays at all."""
        mods = sorted(set(a[0].tolist()))  # a module drawn in two slots counts once
        feeds = {n: feeds[n] for n in self.module_inputs}
        y = self.modules[mods[0]](feeds)[0]  # (1, D_out)
        if out is None:
            out = y
        else:
            out[...] = y
        if w is not None:  # gate: weights in ascending module id, like mods
            out *= w[0, 0]
        for j, m in enumerate(mods[1:], 1):
            if w is None:
                out += self.modules[m](feeds)[0]
            else:
                out += self.modules[m](feeds)[0] * w[0, j]
        if self.spec.combine == "mean" and len(mods) > 1:
            out /= np.float32(len(mods))
        return out


class DenseLayer(Layer):
    """The layer's dense baseline graph: ``layer(feeds) -> (out (B, D_out), a (B, K))``."""

    kind = "dense"

    def __init__(self, spec: LayerSpec, graph: Graph):
        self.spec = spec
        self.graph = graph
        self.inputs = list(graph.input_names)
        dtypes = [t.dtype for t in graph.spec.outputs]
        try:
            self._sel = dtypes.index("int64")
        except ValueError as exc:
            raise BundleError(f"dense graph {graph.name!r} has no int64 selection output") from exc
        self._out = 1 - self._sel if len(dtypes) == 2 else dtypes.index("float32")

    def __call__(
        self, feeds: dict[str, np.ndarray], out: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        res = self.graph(feeds)
        if out is not None:
            out[...] = res[self._out]
            return out, res[self._sel]
        return res[self._out], res[self._sel]


__all__ = ["HostLayer", "DenseLayer"]
