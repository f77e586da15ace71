"""Random-weight feed-forward bundles, built without torch (DESIGN.md §8 ``--synthetic``).

One modular layer, topology ``feedforward``, graphs as in ``modrt.bundle``'s contract:

    layer0.controller  x [B, D] -> MatMul, Add -> Reshape [B, K, M] -> LogSoftmax -> log_probs
    layer0.module<m>   x [R, D] -> MatMul, Add, Relu, MatMul, Add -> y [R, D_out]
    layer0.dense       x [B, D] -> y [B, D_out], selection int64 [B, K]

The dense graph is the MoE layer as a plain ``torch.onnx.export`` would run it: every
module on every row, the selected ones (ArgMax per slot, OneHot, ReduceMax over slots:
a module drawn twice counts once) kept by masking and summed (or averaged).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from modrt import bundle

if TYPE_CHECKING:
    import onnx

OPSET = 17
LAYER = "layer0"


@dataclass(frozen=True)
class Weights:
    """All the numbers of a synthetic layer; ``x @ w1 + b1`` layout (in, out)."""

    wc: np.ndarray  # (D, K*M) controller
    bc: np.ndarray  # (K*M,)
    w1: np.ndarray  # (M, D, H)
    b1: np.ndarray  # (M, H)
    w2: np.ndarray  # (M, H, D_out)
    b2: np.ndarray  # (M, D_out)

    @property
    def modules(self) -> int:
        return self.w1.shape[0]


def random_weights(
    modules: int, k: int, dims: tuple[int, int, int], seed: int = 0
) -> Weights:
    """Gaussian weights scaled by 1/sqrt(fan_in), so activations stay O(1)."""
    D, H, Do = dims
    rng = np.random.default_rng(seed)

    def normal(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        w = rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(1.0 / np.sqrt(fan_in))
        return w

    return Weights(
        wc=normal((D, k * modules), D),
        bc=normal((k * modules,), 1) * np.float32(0.1),
        w1=normal((modules, D, H), D),
        b1=normal((modules, H), 1) * np.float32(0.1),
        w2=normal((modules, H, Do), H),
        b2=normal((modules, Do), 1) * np.float32(0.1),
    )


def build(
    out_dir: str | os.PathLike,
    modules: int = 16,
    k: int = 1,
    dims: tuple[int, int, int] = (1024, 4096, 1024),
    seed: int = 0,
    combine: str = "sum",
    weights: Weights | None = None,
) -> Path:
    """Write a valid random-weight bundle to ``out_dir``; returns the directory.

    ``weights`` overrides the random ones (tests force routing through ``wc``/``bc``).
    """

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    w = weights if weights is not None else random_weights(modules, k, tuple(dims), seed)
    M, D, H = w.w1.shape
    Do = w.w2.shape[2]
    if w.wc.shape != (D, k * M):
        raise ValueError(f"controller weight is {w.wc.shape}, need {(D, k * M)} for k={k}, M={M}")
    graphs = {
        f"{LAYER}.controller": controller_graph(w, k),
        **{f"{LAYER}.module{m}": module_graph(w, m) for m in range(M)},
        f"{LAYER}.dense": dense_graph(w, k, combine),
    }
    specs = bundle.save_graphs(out, graphs)
    manifest = bundle.Manifest(
        task={"name": "synthetic", "kind": "synthetic"},
        topology="feedforward",
        stages=(LAYER,),
        layers=(
            bundle.LayerSpec(
                name=LAYER, modules=M, k=k, combine=combine,
                controller=f"{LAYER}.controller",
                module_graphs=tuple(f"{LAYER}.module{m}" for m in range(M)),
            ),
        ),
        dense={LAYER: f"{LAYER}.dense"},
        graphs=specs,
        opset=OPSET,
        model={"modules": M, "k": k, "dims": [D, H, Do], "seed": seed, "combine": combine},
    )
    bundle.write(out, manifest)
    return out


# --- graphs ---------------------------------------------------------------------------


def _model(nodes, inputs, outputs, inits, name: str):
    from modrt.runtime import graph

    return graph.make_model(nodes, inputs, outputs, inits, name, OPSET, producer="modrt.synthetic")


def _t(name: str, array: np.ndarray):
    from modrt.runtime import graph

    return graph.const(name, array)


def _io(name: str, elem: int, shape: list):
    from onnx import helper

    return helper.make_tensor_value_info(name, elem, shape)


def _controller_nodes(w: Weights, k: int, prefix: str = ""):
    """x -> log_probs [B, K, M] (prefix keeps names unique inside the dense graph)."""
    from onnx import helper

    M = w.modules
    p = prefix
    nodes = [
        helper.make_node("MatMul", ["x", f"{p}Wc"], [f"{p}zc"]),
        helper.make_node("Add", [f"{p}zc", f"{p}bc"], [f"{p}logits"]),  # (B, K*M)
        helper.make_node("Reshape", [f"{p}logits", f"{p}shape"], [f"{p}scores"]),  # (B, K, M)
        helper.make_node("LogSoftmax", [f"{p}scores"], [f"{p}log_probs"], axis=-1),
    ]
    inits = [_t(f"{p}Wc", w.wc), _t(f"{p}bc", w.bc), _t(f"{p}shape", np.array([-1, k, M], np.int64))]
    return nodes, inits


def controller_graph(w: Weights, k: int) -> onnx.ModelProto:
    from onnx import TensorProto

    nodes, inits = _controller_nodes(w, k)
    D = w.wc.shape[0]
    return _model(
        nodes, [_io("x", TensorProto.FLOAT, ["B", D])],
        [_io("log_probs", TensorProto.FLOAT, ["B", k, w.modules])], inits, "controller",
    )


def _module_nodes(w: Weights, m: int, x: str, y: str, p: str):
    from onnx import helper

    nodes = [
        helper.make_node("MatMul", [x, f"{p}W1"], [f"{p}z1"]),
        helper.make_node("Add", [f"{p}z1", f"{p}b1"], [f"{p}a1"]),
        helper.make_node("Relu", [f"{p}a1"], [f"{p}h"]),
        helper.make_node("MatMul", [f"{p}h", f"{p}W2"], [f"{p}z2"]),
        helper.make_node("Add", [f"{p}z2", f"{p}b2"], [y]),
    ]
    inits = [_t(f"{p}W1", w.w1[m]), _t(f"{p}b1", w.b1[m]), _t(f"{p}W2", w.w2[m]), _t(f"{p}b2", w.b2[m])]
    return nodes, inits


def module_graph(w: Weights, m: int) -> onnx.ModelProto:
    from onnx import TensorProto

    nodes, inits = _module_nodes(w, m, "x", "y", "")
    D, Do = w.w1.shape[1], w.w2.shape[2]
    return _model(
        nodes, [_io("x", TensorProto.FLOAT, ["R", D])],
        [_io("y", TensorProto.FLOAT, ["R", Do])], inits, f"module{m}",
    )


def dense_graph(w: Weights, k: int, combine: str = "sum") -> onnx.ModelProto:
    """Every module on every row; the selected ones kept by a (B, M) mask."""
    from onnx import TensorProto, helper

    M, D, _ = w.w1.shape
    Do = w.w2.shape[2]
    nodes, inits = _controller_nodes(w, k, "c_")
    nodes += [
        helper.make_node("ArgMax", ["c_log_probs"], ["selection"], axis=-1, keepdims=0),  # (B, K)
        helper.make_node("OneHot", ["selection", "depth", "onoff"], ["onehot"], axis=-1),  # (B, K, M)
        helper.make_node("ReduceMax", ["onehot"], ["mask"], axes=[1], keepdims=0),  # (B, M)
    ]
    inits += [_t("depth", np.array(M, np.int64)), _t("onoff", np.array([0.0, 1.0], np.float32))]
    ys = []
    for m in range(M):  # one branch per module, as an exported ModuleList loop
        n, i = _module_nodes(w, m, "x", f"m{m}_y", f"m{m}_")
        nodes += n + [helper.make_node("Unsqueeze", [f"m{m}_y", "ax1"], [f"m{m}_y1"])]
        inits += i
        ys.append(f"m{m}_y1")
    inits.append(_t("ax1", np.array([1], np.int64)))
    nodes += [
        helper.make_node("Concat", ys, ["ys"], axis=1),  # (B, M, D_out)
        helper.make_node("Unsqueeze", ["mask", "ax1"], ["mask1"]),  # (B, 1, M)
        helper.make_node("MatMul", ["mask1", "ys"], ["ysum1"]),  # (B, 1, D_out) masked sum
        helper.make_node("Squeeze", ["ysum1", "ax1"], ["ysum"]),  # (B, D_out)
    ]
    if combine == "mean":
        nodes += [
            helper.make_node("ReduceSum", ["mask", "ax1"], ["count"], keepdims=1),  # (B, 1)
            helper.make_node("Div", ["ysum", "count"], ["y"]),
        ]
    elif combine == "sum":
        nodes.append(helper.make_node("Identity", ["ysum"], ["y"]))
    else:
        raise ValueError(f"combine {combine!r} unknown; allowed {bundle.COMBINE_RULES}")
    return _model(
        nodes, [_io("x", TensorProto.FLOAT, ["B", D])],
        [_io("y", TensorProto.FLOAT, ["B", Do]), _io("selection", TensorProto.INT64, ["B", k])],
        inits, "dense",
    )


def read_weights(directory: str | os.PathLike, manifest: bundle.Manifest) -> Weights | None:
    """Recover ``Weights`` from a feed-forward bundle whose modules are two-layer ReLU MLPs
    (read by ``fused.mlp_params``, the one parser of module MLPs) and whose controller
    starts MatMul, Add; None otherwise. Used by ``modrt bench`` for the PyTorch and
    fused-MoE peers."""
    import onnx
    from onnx import numpy_helper

    if manifest.topology != "feedforward" or len(manifest.layers) != 1:
        return None
    layer = manifest.layers[0]

    def params(name: str, ops: list[str]) -> list[np.ndarray] | None:
        g = onnx.load(str(Path(directory) / manifest.graphs[name].file)).graph
        if [n.op_type for n in g.node][: len(ops)] != ops:
            return None
        init = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        return [init[x] for n in g.node[: len(ops)] if n.op_type in ("MatMul", "Add")
                for x in n.input if x in init]

    from modrt.runtime import fused
    from modrt.runtime import graph as g

    c = params(layer.controller, ["MatMul", "Add"])
    parsed = [fused.mlp_params(g.load_graph(directory, manifest, name)) for name in layer.module_graphs]
    if c is None or any(p is None or p[1] != "relu" for p in parsed):
        return None
    mods = [p[0] for p in parsed]
    if len({m[0].shape for m in mods}) != 1 or len({m[2].shape for m in mods}) != 1:
        return None
    return Weights(
        wc=c[0], bc=c[1],
        w1=np.stack([m[0] for m in mods]), b1=np.stack([m[1] for m in mods]),
        w2=np.stack([m[2] for m in mods]), b2=np.stack([m[3] for m in mods]),
    )


__all__ = ["Weights", "random_weights", "build", "read_weights"]
