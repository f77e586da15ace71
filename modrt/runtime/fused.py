"""The ``fused`` strategy (DESIGN.md §6): feed-forward modules run by ONNX Runtime's
``com.microsoft.MoE`` contrib op, one fused kernel for all experts.

    x (B, D) -> controller (inlined) -> log_probs (B, K, M) -> ArgMax per slot -> sel (B, K)
             -> router (B, M): 0 for a module selected in any slot, -2^13 for the others
                (OneHot with values (-2^13, 0), ReduceMax over the slots)
             -> MoE(x, router, experts packed from the module graphs, k=K) -> y (B, D_out)
                (sum rule: times n = M + router @ 2^-13, the distinct modules a row selected:
                 one Gemm, exact, and one Mul)

    K = 1, fewer kernels (each costs ~0.25 µs of a ~25 µs batch-1 call; ``route_one``):
    x -> controller, its final Reshape to (B, 1, M) dropped when provably a no-op for the
         LogSoftmax after it -> log_probs (B, M) -> ArgMax (keepdims) -> sel (B, 1)
                                                 -> Hardmax -> router (B, M)
      -> MoE(x, router, experts, k=1) -> y

Why this router and not the controller's logits: MoE softmaxes its router input, takes the
top k and (``normalize_routing_weights=1``) renormalises their weights. Fed this router,
each of a row's n distinct selected modules gets weight exactly 1/n and every other
module exp(-2^13) = 0 in float32 (one that fills a top-k place left by a repeated module
is computed and weighted 0). So MoE returns the *mean* over the distinct selected
modules, the bundle's ``mean`` rule; ``sum`` is that times n (for K=1, n=1: no scaling).
The router's off value is a power of two so that n comes from one Gemm exactly: each
product is 0 or -1, the sum a small integer. (ReduceSum, Div and Sub did the same in
three kernels: 2-3% of a batch-8 K=3 call on 256-wide modules.)
Only rounding differs from ``routing.combine``; the runtime's tests hold it to the dense
graph row for row.

With K=1, Hardmax is 1 at the *first* maximum of a row, 0 elsewhere: the module ArgMax
(and the dense graph) picks, ties to the lower module id included. MoE's softmax of that
row puts the selected module strictly first (e / (e + M - 1) against 1 / (e + M - 1)),
and its one weight renormalised is p / p = 1 exactly. (A row of NaN log-probabilities,
from NaN or infinite logits, is the exception: Hardmax gives zeros there and MoE another
module; the output is NaN either way, and ``modules`` is ArgMax's, as in the dense graph.)
The Reshape is dropped only when it maps (B, M) to (B, 1, M) and feeds a LogSoftmax over
the last axis: the same rows of M values, one kernel less; otherwise the log-probabilities
are reshaped back to (B, M).

Applies to layers whose module graphs are two-layer MLPs ``MatMul/Gemm, Add, act,
MatMul/Gemm, Add`` with act in ``ACTIVATIONS``; ``unsupported`` says why not otherwise.
The expert layout is checked against numpy at load (ORT changed it across versions).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from modrt import routing
from modrt._exceptions import InputError
from modrt.bundle import LayerSpec, Manifest
from modrt.runtime import graph as g
from modrt.runtime.sessions import SessionConfig

if TYPE_CHECKING:
    import onnx

ACTIVATIONS = {"Relu": "relu", None: "identity"}  # ONNX op between the two linears -> MoE's name
PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")
OFF = 8192.0  # router value of an unselected module, 2^13: exp(-2^13) is 0 in float32


class Experts(NamedTuple):
    """M two-layer MLPs packed in ``x @ w1 + b1`` layout (in, out)."""

    w1: np.ndarray  # (M, D, H)
    b1: np.ndarray  # (M, H)
    w2: np.ndarray  # (M, H, D_out)
    b2: np.ndarray  # (M, D_out)
    activation: str  # MoE activation_type


def mlp_params(graph: onnx.GraphProto) -> tuple[list[np.ndarray], str] | None:
    """([w1 (D, H), b1, w2 (H, D_out), b2], activation) of a two-layer MLP graph, or None."""
    from onnx import helper, numpy_helper

    init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    nodes = list(graph.node)
    linears, act = [], None
    i, cur = 0, graph.input[0].name if len(graph.input) == 1 else None
    if cur is None:
        return None
    while i < len(nodes):
        n = nodes[i]
        if n.op_type in ("MatMul", "Gemm") and n.input[0] == cur and n.input[1] in init:
            w = init[n.input[1]].astype(np.float32)
            b = None
            if n.op_type == "Gemm":
                attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
                if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                    return None
                w = w.T if attrs.get("transB", 0) else w
                if len(n.input) > 2 and n.input[2] and n.input[2] not in init:
                    return None
                b = init[n.input[2]] if len(n.input) > 2 and n.input[2] else None
                cur = n.output[0]
                i += 1
            else:
                cur = n.output[0]
                i += 1
                if i < len(nodes) and nodes[i].op_type == "Add" and cur in nodes[i].input:
                    other = [x for x in nodes[i].input if x != cur]
                    if len(other) != 1 or other[0] not in init:
                        return None
                    b = init[other[0]]
                    cur = nodes[i].output[0]
                    i += 1
            if w.ndim != 2:
                return None
            b = np.zeros(w.shape[1], np.float32) if b is None else np.broadcast_to(b, (w.shape[1],))
            linears.append((w, b.astype(np.float32)))
        elif len(linears) == 1 and act is None and n.op_type in ACTIVATIONS and n.input[0] == cur:
            act = n.op_type
            cur = n.output[0]
            i += 1
        else:
            return None
    if len(linears) != 2 or cur != graph.output[0].name:
        return None
    (w1, b1), (w2, b2) = linears
    return [w1, b1, w2, b2], ACTIVATIONS[act]


def pack(directory: str | os.PathLike, manifest: Manifest, spec: LayerSpec) -> Experts | None:
    """The layer's module graphs as packed experts; None if any is not a two-layer MLP."""
    params = [mlp_params(g.load_graph(directory, manifest, name)) for name in spec.module_graphs]
    if any(p is None for p in params) or len({p[1] for p in params}) != 1:
        return None
    try:
        return Experts(*(np.stack([p[0][i] for p in params]) for i in range(4)), params[0][1])
    except ValueError:  # modules of different shapes
        return None


def moe_node(b: g.Builder, x: str, router: str, experts: Experts, k: int, out: str) -> str:
    """Append a ``com.microsoft.MoE`` node; weights in its (E, out, in) layout (ORT >= 1.22)."""
    w1 = b.const(experts.w1.transpose(0, 2, 1))  # (M, H, D)
    w2 = b.const(experts.w2.transpose(0, 2, 1))  # (M, D_out, H)
    return b.node("MoE", [x, router, w1, b.const(experts.b1), w2, b.const(experts.b2)], [out],
                  domain="com.microsoft", k=k, normalize_routing_weights=1,
                  activation_type=experts.activation)


def unsupported(spec: LayerSpec, manifest: Manifest, provider: str) -> str | None:
    """Why the fused strategy cannot run this layer (None: it can, pending ``pack``)."""
    selection = getattr(spec, "selection", "slots")
    if selection != "slots":
        return f"selection {selection!r} (only 'slots')"
    if spec.combine not in g.COMBINES:
        return f"combine {spec.combine!r} (only {', '.join(g.COMBINES)})"
    if manifest.topology != "feedforward" or spec.state is not None:
        return "recurrent modules (MoE takes feed-forward MLP experts)"
    if provider not in PROVIDERS:
        return f"{provider} has no com.microsoft.MoE kernel"
    ctrl_in = manifest.graphs[spec.controller].inputs
    mod_in = manifest.graphs[spec.module_graphs[0]].inputs
    if len(ctrl_in) != 1 or len(mod_in) != 1 or ctrl_in[0].name != mod_in[0].name or len(mod_in[0].shape) != 2:
        return "the controller and modules must take the same one 2-D input"
    if mod_in[0].dtype != "float32":
        return f"module inputs are {mod_in[0].dtype} (experts are packed as float32)"
    if any(getattr(manifest.graphs[m], "precision", "float32") != "float32" for m in spec.module_graphs):
        return "its module graphs are int8 (the MoE kernel is fed float32 expert weights)"
    out = manifest.graphs[spec.module_graphs[0]].outputs
    if len(out) != 1 or out[0].shape[1:] != mod_in[0].shape[1:]:
        return "MoE experts map D features to D features; these modules change the width"
    return None


def _slot_reshape(graph: onnx.GraphProto, lp: str, opset: int, M: int) -> onnx.NodeProto | None:
    """The Reshape (B, M) -> (B, 1, M) right before the controller's final LogSoftmax over
    the last axis, or None if the graph does not end that way (shapes from ONNX's shape
    inference; anything it cannot tell counts as "does not")."""
    from onnx import helper, shape_inference

    producer = {o: n for n in graph.node for o in n.output}
    last = producer.get(lp)
    if opset < 13 or last is None or last.op_type != "LogSoftmax":
        return None  # before opset 13, LogSoftmax's axis meant "flatten from here"
    axis = next((helper.get_attribute_value(a) for a in last.attribute if a.name == "axis"), -1)
    reshape = producer.get(last.input[0])
    if axis not in (-1, 2) or reshape is None or reshape.op_type != "Reshape":
        return None
    try:
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        inferred = shape_inference.infer_shapes(model, strict_mode=True).graph
    except Exception:  # noqa: BLE001 - no shapes: keep the graph as it is
        return None
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.value_info, *inferred.input, *inferred.output]
              if v.type.tensor_type.HasField("shape")}
    src, dst = shapes.get(reshape.input[0]), shapes.get(reshape.output[0])
    if src is None or dst is None or len(src) != 2 or src[1] != M or dst[1:] != [1, M] or len(dst) != 3:
        return None
    return reshape


def route_one(b: g.Builder, ctrl: onnx.GraphProto, lp: str, opset: int, M: int) -> str:
    """K = 1: the controller's nodes (output ``lp``, (B, 1, M) log-probabilities; its final
    Reshape dropped where it is a no-op for the LogSoftmax after it), selection (B, 1) int32
    and a Hardmax router (B, M). Returns the router's name."""
    from onnx import TensorProto

    reshape = _slot_reshape(ctrl, lp, opset, M)
    if reshape is not None:
        softmax = next(n for n in ctrl.node if lp in n.output)
        softmax.input[0] = reshape.input[0]  # the same rows of M values: the same kernel, bit for bit
        needed, nodes = {lp}, []
        for n in reversed(ctrl.node):  # drop what only the Reshape used
            if needed & set(n.output):
                nodes.append(n)
                needed.update(i for i in n.input if i)
        del ctrl.node[:]
        ctrl.node.extend(reversed(nodes))
    b.inline(ctrl)
    if reshape is None:
        lp = b.node("Reshape", [lp, b.const(np.array([-1, M], np.int64))], ["route/log_probs"])
    sel64 = b.node("ArgMax", [lp], ["route/sel64"], axis=-1, keepdims=1)  # (B, 1): the first maximum
    b.node("Cast", [sel64], [g.SEL], to=TensorProto.INT32)
    return b.node("Hardmax", [lp], ["route/router"], axis=-1)  # (B, M): 1 at that same first maximum


def compose(directory: str | os.PathLike, manifest: Manifest, spec: LayerSpec, experts: Experts) -> onnx.ModelProto:
    """Controller + mask router + MoE as one model; outputs (y (B, D_out), selection (B, K))."""
    from onnx import TensorProto, helper

    b = g.Builder(max(manifest.opset, g.MIN_OPSET))
    ctrl = g.prefixed(g.load_graph(directory, manifest, spec.controller), "c/")
    x = manifest.graphs[spec.controller].inputs[0].name
    for n in ctrl.node:
        n.input[:] = [x if i == f"c/{x}" else i for i in n.input]
    for t in ctrl.input:  # the layer's input under its own name (shape inference reads it)
        if t.name == f"c/{x}":
            t.name = x
    lp = f"c/{manifest.graphs[spec.controller].outputs[0].name}"
    if spec.k == 1:
        router = route_one(b, ctrl, lp, manifest.opset, spec.modules)
    else:
        b.inline(ctrl)
        # router (B, M): 0 for a selected module, -OFF for the others
        _, router = b.route(lp, spec.modules, off=-OFF, on=0.0)
    out_spec = manifest.graphs[spec.module_graphs[0]].outputs[0]
    out = out_spec.name
    if spec.combine == "sum" and spec.k > 1:  # MoE gives the mean over the n distinct: times n
        mean = moe_node(b, x, router, experts, spec.k, "fused/mean")
        # n (B, 1) = M + sum(router) / OFF: router entries are 0 or -OFF, so exact
        n = b.node("Gemm", [router, b.const(np.full((spec.modules, 1), 1.0 / OFF, np.float32)),
                            b.const(np.array([[spec.modules]], np.float32))], ["fused/distinct"])
        b.node("Mul", [mean, n], [out])
    else:
        moe_node(b, x, router, experts, spec.k, out)
    outs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["B", *out_spec.shape[1:]]),
            helper.make_tensor_value_info(g.SEL, TensorProto.INT32, ["B", spec.k])]
    return b.model(g.io_info(manifest, spec.controller, "inputs"), outs, f"{spec.name}.fused")


class FusedLayer(g.ComposedLayer):
    """A feed-forward modular layer run by ORT's MoE op: ``layer(feeds) -> (y, a (B, K))``."""

    kind = "fused"

    def __init__(self, directory: str | os.PathLike, manifest: Manifest, spec: LayerSpec,
                 config: SessionConfig, providers: g.Providers):
        why = unsupported(spec, manifest, g.provider_names(providers)[0])
        experts = None if why else pack(directory, manifest, spec)
        if experts is None and not why:
            why = "module graphs are not two-layer MLPs (MatMul/Gemm, Add, Relu, MatMul/Gemm, Add)"
        if why:
            raise InputError(f"strategy 'fused' cannot run layer {spec.name}: {why}")
        self._bind(compose(directory, manifest, spec, experts), manifest, spec, config, providers)
        self._check(experts, manifest)

    def _check(self, experts: Experts, manifest: Manifest) -> None:
        """One small batch against numpy: MoE's weight layout has changed across ORT versions."""
        D = manifest.graphs[self.spec.controller].inputs[0].shape[1]
        x = np.random.default_rng(0).standard_normal((6, D), dtype=np.float32)
        y, a = self(dict(zip(self.inputs, [x], strict=True)))
        e = experts
        want = routing.mlp_reference(e.w1, e.b1, e.w2, e.b2, x.astype(np.float64), a, self.spec.combine,
                                     e.activation)
        if not np.allclose(y, want, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(want).max()))):
            raise InputError(f"strategy 'fused' cannot run layer {self.spec.name}: com.microsoft.MoE "
                             "disagrees with the modules (expert layout of this onnxruntime?)")


__all__ = ["FusedLayer", "Experts", "compose", "mlp_params", "moe_node", "pack", "route_one",
           "unsupported"]
