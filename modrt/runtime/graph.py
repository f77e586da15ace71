"""The ``graph`` strategy (DESIGN.md §6): a modular layer as one ONNX graph, composed at
load time from the bundle's own controller and module graphs, routing inside the graph.

One ``run()`` per layer call (per time step in a recurrent network) instead of one for
the controller and one per selected module: per-call overhead (~4 µs plus numpy glue
per call on CPU) is what makes the host strategy lose on small modules.

    inputs (x) or (e, h)                                        (B, D...)
    route     controller -> ArgMax per slot -> sel               (B, K) int32
              OneHot, ReduceMax over slots -> mask                (B, M)  distinct modules
    dispatch  NonZero over mask^T (module-major, row-minor)       (R,)   pair ids
              rows = ids mod B; counts = mask summed over rows    (R,), (M,)
              Gather each module input at rows, Split by counts   M pieces (R_m, ...)
    modules   each module's nodes inlined (names prefixed m<i>/); a module of more than a
              few nodes sits inside an ``If`` on R_m > 0, so that a module nobody selected
              runs none of its nodes (a small one runs its few nodes on 0 rows: cheaper)
    combine   Concat -> ScatterND(add) into (B, D_out) zeros; mean: / distinct count

A module drawn in two slots appears once in ``mask``, so it is computed and added once:
``routing.combine``'s rule (sum, or mean over the distinct selected modules). Rows keep
batch order inside each module's block, as ``routing.dispatch`` orders them.

Only ``selection == "slots"`` layers (K independent argmaxes) with ``sum``/``mean`` are
composed; ``unsupported`` says why another layer is not.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modrt._exceptions import BundleError, InputError
from modrt.bundle import LayerSpec, Manifest
from modrt.runtime import errors
from modrt.runtime.layer import Layer
from modrt.runtime.sessions import SessionConfig, fast_run, session_options

if TYPE_CHECKING:
    import onnx

COMBINES = ("sum", "mean")
MIN_OPSET = 16  # ScatterND with reduction="add"
MAX_PROTO_BYTES = (1 << 31) - 1  # one in-memory ONNX model (protobuf's limit)
SEL = "selection"


def unsupported(spec: LayerSpec, manifest: Manifest, provider: str) -> str | None:
    """Why this layer cannot be composed into one graph (None: it can)."""
    selection = getattr(spec, "selection", "slots")
    if selection != "slots":
        return f"selection {selection!r} (only 'slots' is composed in-graph)"
    if spec.combine not in COMBINES:
        return f"combine {spec.combine!r} (only {', '.join(COMBINES)})"
    if provider == "TensorrtExecutionProvider":
        return "TensorRT does not take NonZero/If graphs; use host with per-module engines"
    if manifest.opset < MIN_OPSET:
        return f"bundle opset {manifest.opset} < {MIN_OPSET} (ScatterND add)"
    outs = manifest.graphs[spec.module_graphs[0]].outputs
    if len(outs) != 1 or any(d < 0 for d in outs[0].shape[1:]):
        return "module graphs must have one output with a static feature shape"
    if len(outs[0].shape) != 2:
        return f"modules give feature maps {list(outs[0].shape[1:])} (composed graphs combine vectors (B, D))"
    if outs[0].dtype != "float32":
        return f"module outputs are {outs[0].dtype} (composed graphs combine float32)"
    return None


# --- onnx plumbing shared with the fused strategy ------------------------------------------


def load_graph(directory: str | os.PathLike, manifest: Manifest, name: str) -> onnx.GraphProto:
    import onnx

    path = Path(directory) / manifest.graphs[name].file
    try:
        return onnx.load(str(path)).graph
    except Exception as exc:  # noqa: BLE001 - any parse failure
        raise BundleError(f"{path}: cannot read it as ONNX ({type(exc).__name__})") from exc


def prefixed(graph: onnx.GraphProto, prefix: str) -> onnx.GraphProto:
    """Every name in ``graph`` (edges, initializers, inputs, outputs) made unique with ``prefix``."""
    from onnx import compose

    return compose.add_prefix_graph(graph, prefix)


def const(name: str, array: np.ndarray) -> onnx.TensorProto:
    from onnx import numpy_helper

    a = np.asarray(array)
    return numpy_helper.from_array(a if a.flags.c_contiguous else a.copy(order="C"), name)  # 0-d stays 0-d


class Builder:
    """Nodes and initializers of the composed graph, with opset-aware helpers."""

    def __init__(self, opset: int, prefix: str = "route/"):
        self.opset = opset
        self.prefix = prefix  # of constants' names: unique across a graph and its subgraphs
        self.nodes: list = []
        self.inits: list = []
        self._consts: dict[tuple, str] = {}

    def node(self, op: str, inputs: list[str], outputs: list[str], **attrs: Any) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, outputs, **attrs))
        return outputs[0]

    def const(self, array: np.ndarray) -> str:
        a = np.asarray(array)
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self._consts:
            name = f"{self.prefix}c{len(self._consts)}"
            self.inits.append(const(name, a))
            self._consts[key] = name
        return self._consts[key]

    def reduce(self, op: str, x: str, axes: list[int], out: str, keepdims: int = 0) -> str:
        # ReduceSum takes axes as an input from opset 13, the other reductions from 18.
        if op == "ReduceSum" or self.opset >= 18:
            return self.node(op, [x, self.const(np.array(axes, np.int64))], [out], keepdims=keepdims)
        return self.node(op, [x], [out], axes=axes, keepdims=keepdims)

    def inline(self, graph: onnx.GraphProto) -> None:
        self.nodes.extend(graph.node)
        self.inits.extend(graph.initializer)

    def route(self, log_probs: str, M: int, off: float = 0.0, on: float = 1.0) -> tuple[str, str]:
        """(B, K, M) log-probabilities -> selection (B, K) int32 and (B, M) float: ``on`` where
        the row selected the module in any slot (a repeat counts once), ``off`` elsewhere."""
        from onnx import TensorProto

        # int32, the dtype of Model's ``modules``: one Cast here is cheaper than numpy's astype
        sel64 = self.node("ArgMax", [log_probs], ["route/sel64"], axis=-1, keepdims=0)  # (B, K)
        sel = self.node("Cast", [sel64], [SEL], to=TensorProto.INT32)
        onehot = self.node("OneHot", [sel64, self.const(np.array(M, np.int64)),
                                      self.const(np.array([off, on], np.float32))], ["route/onehot"], axis=-1)
        mask = self.reduce("ReduceMax", onehot, [1], "route/mask")  # (B, M)
        return sel, mask

    def model(self, inputs: list, outputs: list, name: str) -> onnx.ModelProto:
        return make_model(self.nodes, inputs, outputs, self.inits, name, self.opset)


def make_model(nodes: list, inputs: list, outputs: list, inits: list, name: str, opset: int,
               producer: str = "modrt.runtime") -> onnx.ModelProto:
    """The one place modrt assembles an ONNX model (the composed graphs and the synthetic
    bundles): the default domain at ``opset``, version 1 of any custom domain its nodes use
    (com.microsoft for MoE), IR version 8 (readable by every onnxruntime >= 1.14)."""
    from onnx import helper

    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    domains = {n.domain for n in nodes if n.domain not in ("", "ai.onnx")}
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]
                              + [helper.make_opsetid(d, 1) for d in sorted(domains)], producer_name=producer)
    model.ir_version = 8
    return model


def io_info(manifest: Manifest, graph: str, which: str, batch: str = "B") -> list:
    """Value infos of a graph's inputs/outputs from the manifest, batch renamed ``batch``."""
    from onnx import helper

    from modrt.bundle import ONNX_DTYPES

    elem = {v: k for k, v in ONNX_DTYPES.items()}
    specs = getattr(manifest.graphs[graph], which)
    return [helper.make_tensor_value_info(t.name, elem[t.dtype], [batch, *t.shape[1:]]) for t in specs]


Providers = list  # provider names, or (name, options) pairs as ``providers.providers_for`` gives


def provider_names(providers: Providers) -> list[str]:
    return [p if isinstance(p, str) else p[0] for p in providers]


def session(model: onnx.ModelProto, config: SessionConfig, providers: Providers, what: str) -> Any:
    """An ORT session on a composed model; threads sized by its largest weight."""
    import onnxruntime as ort

    raw = model.SerializeToString()
    if len(raw) > MAX_PROTO_BYTES:
        raise InputError(f"{what}: the composed graph is over 2 GiB; use the host strategy")
    work = max((int(np.prod(t.dims)) * 4 for t in _all_initializers(model.graph)), default=0)
    options = session_options(config, work)
    with errors.loading(f"{what}, its composed graph"):
        return ort.InferenceSession(raw, options, providers=provider_names(providers),
                                    provider_options=[{} if isinstance(p, str) else p[1] for p in providers])


def _all_initializers(graph):
    yield from graph.initializer
    for n in graph.node:
        for a in n.attribute:
            if a.g.node or a.g.initializer:
                yield from _all_initializers(a.g)


# --- the composed layer ----------------------------------------------------------------------


# A module with more nodes than this runs behind an If that skips it when it has no rows;
# a smaller one runs on its empty block. Measured on 2 cores, M=15, batch 1 (14 modules
# empty): an If costs ~1.6 µs, a node on an empty tensor ~0.28 µs; a 5-node MLP layer
# 35 µs without Ifs, 43 µs with; a 16-node GRU cell layer 96 µs without, 57 µs with.
IF_ABOVE_NODES = 6


def compose(directory: str | os.PathLike, manifest: Manifest, spec: LayerSpec,
            skip_empty: bool | None = None) -> onnx.ModelProto:
    """Controller + modules + routing as one ONNX model; outputs (out (B, D_out), selection).

    ``skip_empty``: put each module behind an ``If`` on "has rows" (None: when the module
    has more than ``IF_ABOVE_NODES`` nodes)."""
    from onnx import TensorProto, helper

    M, K = spec.modules, spec.k
    b = Builder(max(manifest.opset, MIN_OPSET))
    ctrl = prefixed(load_graph(directory, manifest, spec.controller), "c/")
    b.inline(ctrl)
    # The controller's inputs are the layer's inputs, under their own names.
    inputs = [t.name for t in manifest.graphs[spec.controller].inputs]
    rename = {f"c/{n}": n for n in inputs}
    for n in ctrl.node:
        n.input[:] = [rename.get(i, i) for i in n.input]
    sel, mask = b.route(f"c/{manifest.graphs[spec.controller].outputs[0].name}", M)

    mod_in = [t.name for t in manifest.graphs[spec.module_graphs[0]].inputs]
    missing = set(mod_in) - set(inputs)
    if missing:
        raise BundleError(f"layer {spec.name}: module inputs {sorted(missing)} are not controller inputs")
    out_spec = manifest.graphs[spec.module_graphs[0]].outputs[0]
    Do = list(out_spec.shape[1:])

    maskT = b.node("Transpose", [mask], ["route/maskT"], perm=[1, 0])  # (M, B)
    counts_f = b.reduce("ReduceSum", maskT, [1], "route/counts_f")  # (M,)
    counts = b.node("Cast", [counts_f], ["route/counts"], to=TensorProto.INT64)
    flat = b.node("Reshape", [maskT, b.const(np.array([-1], np.int64))], ["route/flat"])  # (M*B,)
    nz = b.node("NonZero", [flat], ["route/nz"])  # (1, R): module-major, rows ascending
    pairs = b.node("Squeeze", [nz, b.const(np.array([0], np.int64))], ["route/pairs"])  # (R,)
    batch = b.node("Shape", [inputs[0]], ["route/B"], start=0, end=1)  # (1,)
    rows = b.node("Mod", [pairs, batch], ["route/rows"])  # (R,)
    pieces: dict[str, list[str]] = {}
    for n in mod_in:  # one gather per input for all modules, split into M blocks
        g = b.node("Gather", [n, rows], [f"route/g_{n}"], axis=0)  # (R, ...)
        pieces[n] = [f"m{m}/{n}" for m in range(M)]
        b.node("Split", [g, counts], pieces[n], axis=0)
    if skip_empty is None:
        sizes = [len(load_graph(directory, manifest, n).node) for n in spec.module_graphs[:1]]
        skip_empty = sizes[0] > IF_ABOVE_NODES
    if skip_empty:
        has = b.node("Greater", [counts, b.const(np.array(0, np.int64))], ["route/has"])  # (M,)
        flags = [f"route/has{m}" for m in range(M)]
        b.node("Split", [has, b.const(np.ones(M, np.int64))], flags, axis=0)
        empty = b.const(np.zeros([0, *Do], np.float32))
    ys = []
    for m, gname in enumerate(spec.module_graphs):
        g = prefixed(load_graph(directory, manifest, gname), f"m{m}/")
        y = g.output[0].name
        if not skip_empty:
            b.inline(g)
            ys.append(y)
            continue
        then = helper.make_graph(list(g.node), f"m{m}_then", [], [
            helper.make_tensor_value_info(y, TensorProto.FLOAT, ["R", *Do])], initializer=list(g.initializer))
        other = helper.make_graph([helper.make_node("Identity", [empty], [f"m{m}/empty"])], f"m{m}_else", [], [
            helper.make_tensor_value_info(f"m{m}/empty", TensorProto.FLOAT, [0, *Do])])
        ys.append(b.node("If", [flags[m]], [f"m{m}/out"], then_branch=then, else_branch=other))
    ycat = b.node("Concat", ys, ["route/y"], axis=0)  # (R, D_out) in dispatch order
    shape = b.node("Concat", [batch, b.const(np.array(Do, np.int64))], ["route/out_shape"], axis=0)
    zeros = b.node("ConstantOfShape", [shape], ["route/zeros"],
                   value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    idx = b.node("Unsqueeze", [rows, b.const(np.array([1], np.int64))], ["route/idx"])  # (R, 1)
    out = out_spec.name
    if K == 1:  # every row in exactly one block: a plain scatter
        b.node("ScatterND", [zeros, idx, ycat], [out])
    else:
        summed = b.node("ScatterND", [zeros, idx, ycat], ["route/sum" if spec.combine == "mean" else out],
                        reduction="add")
        if spec.combine == "mean":
            distinct = b.reduce("ReduceSum", mask, [1], "route/distinct", keepdims=1)  # (B, 1)
            b.node("Div", [summed, distinct], [out])
    ins = io_info(manifest, spec.controller, "inputs")
    outs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["B", *Do]),
            helper.make_tensor_value_info(SEL, TensorProto.INT32, ["B", K])]
    return b.model(ins, outs, f"{spec.name}.graph")


class ComposedLayer(Layer):
    """A modular layer run as one session of a composed model (``graph``, ``fused``):
    ``layer(feeds) -> (out (B, D_out), a (B, K) int32)``."""

    kind = "composed"

    def _bind(self, model: onnx.ModelProto, manifest: Manifest, spec: LayerSpec, config: SessionConfig,
              providers: Providers) -> None:
        self.spec = spec
        self.inputs = [t.name for t in manifest.graphs[spec.controller].inputs]
        self.session = session(model, config, providers, f"layer {spec.name} ({self.kind} strategy)")
        self._names = [manifest.graphs[spec.module_graphs[0]].outputs[0].name, SEL]
        self._run = fast_run(self.session)
        # raw(feeds, None) -> [out, a]: the run without __call__'s frame, for Model.run's fast
        # path (which converts its errors as __call__ does)
        self.raw = functools.partial(self._run, self._names)
        self.where = f"{spec.name} ({self.kind})"

    def __call__(self, feeds: dict[str, np.ndarray], out: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        try:
            y, a = self._run(self._names, feeds, None)
        except Exception as exc:  # errors.running's conversion, inline on this hot path
            raise errors.convert(self.where, exc) from exc
        if out is not None:
            out[...] = y
            return out, a
        return y, a


class GraphLayer(ComposedLayer):
    """One modular layer as one session, routing inside the graph (``compose``)."""

    kind = "graph"

    def __init__(self, directory: str | os.PathLike, manifest: Manifest, spec: LayerSpec,
                 config: SessionConfig, providers: Providers):
        why = unsupported(spec, manifest, provider_names(providers)[0])
        if why:
            raise InputError(f"strategy 'graph' cannot run layer {spec.name}: {why}")
        self._bind(compose(directory, manifest, spec), manifest, spec, config, providers)


__all__ = ["ComposedLayer", "GraphLayer", "compose", "unsupported", "Builder", "fast_run", "load_graph",
           "prefixed", "session", "provider_names", "io_info"]
