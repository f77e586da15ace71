"""The ``graph-loop`` variant of the graph strategy, for a recurrent bundle's one modular
layer: the composed step graph (``graph.compose``) as the body of an ONNX ``Loop`` over
the time steps, so a whole window is one ``run()`` instead of one per step.

    x_tm (T, B, E), h0 (B, H)
      Loop t = 0..T-1, carried h:   e_t = x_tm[t];  (h, sel_t) = step(e_t, h)
    -> h_last (B, H), hs (T, B, H) (every step's state), sel (T, B, K) int32

Measured on the 2-core CPU with a PTB bundle (M=15 K=1, 35-token windows, whole model,
interleaved in one process, other work at low priority): batch 8, 20.1 ms per window
against 21.1 ms for the per-step graph and 21.4 ms for host; batch 64, 112.8 against
113.9 and 115.7 ms (an earlier comparison: 103 against 113 ms). At batch 1 the host loop
is faster (3.0 ms against 3.5 ms: the composed step pays an ``If`` per module). ``auto``
measures it beside the per-step strategies, on windows, and keeps it where it wins.
"""

from __future__ import annotations

import os

import numpy as np

from modrt._exceptions import InputError
from modrt.bundle import LayerSpec, Manifest
from modrt.runtime import errors
from modrt.runtime import graph as g
from modrt.runtime.layer import Layer
from modrt.runtime.sessions import SessionConfig, fast_run

X_TM = "loop/x_tm"  # the outer input: the layer's per-step input over time, (T, B, E)


def compose_loop(directory: str | os.PathLike, manifest: Manifest, spec: LayerSpec):
    """(x_tm (T, B, E), state (B, H)) -> (h_last, hs (T, B, H), selection (T, B, K))."""
    import onnx
    from onnx import TensorProto, helper

    step = g.compose(directory, manifest, spec)
    ctrl_in = manifest.graphs[spec.controller].inputs
    state = spec.state
    xs = [t for t in ctrl_in if t.name != state]
    H = next(t.shape[1] for t in ctrl_in if t.name == state)
    out = manifest.graphs[spec.module_graphs[0]].outputs[0].name
    K = spec.k
    body_nodes = [helper.make_node("Gather", [X_TM, "loop/t"], [xs[0].name], axis=0)]  # (B, E)
    body_nodes += list(step.graph.node)
    body_nodes += [helper.make_node("Identity", ["loop/cond"], ["loop/cond_out"]),
                   helper.make_node("Identity", [out], ["loop/h_t"])]
    body = helper.make_graph(
        body_nodes, f"{spec.name}.step",
        [helper.make_tensor_value_info("loop/t", TensorProto.INT64, []),
         helper.make_tensor_value_info("loop/cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info(state, TensorProto.FLOAT, ["B", H])],
        [helper.make_tensor_value_info("loop/cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info(out, TensorProto.FLOAT, ["B", H]),
         helper.make_tensor_value_info("loop/h_t", TensorProto.FLOAT, ["B", H]),
         helper.make_tensor_value_info(g.SEL, TensorProto.INT32, ["B", K])],
        initializer=list(step.graph.initializer))
    b = g.Builder(step.opset_import[0].version, prefix="loop/")
    T = b.node("Shape", [X_TM], ["loop/T1"], start=0, end=1)
    trips = b.node("Squeeze", [T, b.const(np.array([0], np.int64))], ["loop/T"])
    b.node("Loop", [trips, b.const(np.array(True)), state], ["h_last", "hs", "sel"], body=body)
    E = list(xs[0].shape[1:])
    model = b.model(
        [helper.make_tensor_value_info(X_TM, TensorProto.FLOAT, ["T", "B", *E]),
         helper.make_tensor_value_info(state, TensorProto.FLOAT, ["B", H])],
        [helper.make_tensor_value_info("h_last", TensorProto.FLOAT, ["B", H]),
         helper.make_tensor_value_info("hs", TensorProto.FLOAT, ["T", "B", H]),
         helper.make_tensor_value_info("sel", TensorProto.INT32, ["T", "B", K])],
        f"{spec.name}.loop")
    model.opset_import.extend(o for o in step.opset_import if o.domain not in ("", "ai.onnx")
                              and o.domain not in {m.domain for m in model.opset_import})
    onnx.checker.check_model(model)
    return model


class LoopLayer(Layer):
    """A recurrent layer over a whole window in one call: ``window(x_tm, h0) -> (hs, sel, h_last)``.

    Called like a step layer (``layer(feeds) -> (h, a)``) it runs a one-step Loop, so it
    can stand in anywhere a step layer does (slower there: that is not what it is for)."""

    kind = "graph-loop"

    def __init__(self, directory: str | os.PathLike, manifest: Manifest, spec: LayerSpec,
                 config: SessionConfig, providers: g.Providers):
        why = g.unsupported(spec, manifest, g.provider_names(providers)[0])
        ctrl_in = manifest.graphs[spec.controller].inputs
        if not why and (spec.state is None or len(ctrl_in) != 2 or manifest.topology != "recurrent"):
            why = "a Loop over time needs a recurrent layer taking (input, state)"
        if why:
            raise InputError(f"strategy 'graph-loop' cannot run layer {spec.name}: {why}")
        self.spec = spec
        self.inputs = [t.name for t in ctrl_in]
        self._x = next(n for n in self.inputs if n != spec.state)
        self.session = g.session(compose_loop(directory, manifest, spec), config, providers,
                                 f"layer {spec.name} (graph-loop strategy)")
        self._run = fast_run(self.session)
        self._names = ["hs", "sel", "h_last"]

    def window(self, x_tm: np.ndarray, h0: np.ndarray, hs: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x_tm (T, B, E), h0 (B, H) -> hs (T, B, H), sel (T, B, K) int32, h_last (B, H)
        (the Loop's own hs: ``hs`` is not written)."""
        feeds = {X_TM: x_tm, self.spec.state: h0}
        with errors.running(f"{self.spec.name} ({self.kind})"):
            hs, sel, h_last = self._run(self._names, feeds, None)
        return hs, sel, h_last

    def __call__(self, feeds: dict[str, np.ndarray], out: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        hs, sel, _ = self.window(feeds[self._x][None], feeds[self.spec.state])
        if out is not None:
            out[...] = hs[0]
            return out, sel[0]
        return hs[0], sel[0]


__all__ = ["LoopLayer", "compose_loop", "X_TM"]
