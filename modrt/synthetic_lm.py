"""Random-weight recurrent language-model bundles (the PTB contract), built without torch.

Tests and ``modrt bench`` use them to exercise the recurrent runtime before any model is
trained. Graphs follow ``modrt.bundle``'s recurrent contract; each module is a GRU cell
with PyTorch's equations (``nn.GRUCell``):

    embedding          tokens int64 [B, T] -> Gather -> emb [B, T, E]
    layer0.controller  e [B, E], h [B, H] -> Concat, MatMul, Add, Reshape, LogSoftmax
                       -> log_probs [B, K, M]
    layer0.module<m>   e [R, E], h [R, H] -> h_new [R, H]     (one GRU step)
    layer0.dense       e [B, E], h [B, H] -> h_new [B, H], selection int64 [B, K]
    head               hs [B, T, H] -> MatMul, Add -> logits [B, T, V]

``selection="topk"`` builds noisy top-k's inference form instead: one distribution
(log_probs [B, 1, M]), its k most probable modules (TopK: ties to the lower id), combined
with rule "gate" (weights: the softmax of the selected log-probabilities).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from modrt import bundle
from modrt.synthetic import OPSET, _io, _model, _t

LAYER = "layer0"


def _gru_nodes(p: str, e: str, h: str, out: str, w: dict[str, np.ndarray]):
    """One GRU step: r, z, n gates as nn.GRUCell computes them; weights (in, 3H)."""
    from onnx import helper

    n = helper.make_node
    nodes = [
        n("MatMul", [e, f"{p}Wi"], [f"{p}gi0"]), n("Add", [f"{p}gi0", f"{p}bi"], [f"{p}gi"]),
        n("MatMul", [h, f"{p}Wh"], [f"{p}gh0"]), n("Add", [f"{p}gh0", f"{p}bh"], [f"{p}gh"]),
        n("Split", [f"{p}gi"], [f"{p}ir", f"{p}iz", f"{p}in"], axis=1),
        n("Split", [f"{p}gh"], [f"{p}hr", f"{p}hz", f"{p}hn"], axis=1),
        n("Add", [f"{p}ir", f"{p}hr"], [f"{p}r0"]), n("Sigmoid", [f"{p}r0"], [f"{p}r"]),
        n("Add", [f"{p}iz", f"{p}hz"], [f"{p}z0"]), n("Sigmoid", [f"{p}z0"], [f"{p}z"]),
        n("Mul", [f"{p}r", f"{p}hn"], [f"{p}rn"]), n("Add", [f"{p}in", f"{p}rn"], [f"{p}n0"]),
        n("Tanh", [f"{p}n0"], [f"{p}n"]),
        # h' = (1 - z) * n + z * h = n + z * (h - n)
        n("Sub", [h, f"{p}n"], [f"{p}d"]), n("Mul", [f"{p}z", f"{p}d"], [f"{p}zd"]),
        n("Add", [f"{p}n", f"{p}zd"], [out]),
    ]
    return nodes, [_t(f"{p}{k}", v) for k, v in w.items()]


def _controller_nodes(p: str, wc: np.ndarray, bc: np.ndarray, k: int, M: int):
    from onnx import helper

    n = helper.make_node
    nodes = [
        n("Concat", ["e", "h"], [f"{p}eh"], axis=1),  # (B, E+H): the controller sees [e_t; h]
        n("MatMul", [f"{p}eh", f"{p}Wc"], [f"{p}zc"]), n("Add", [f"{p}zc", f"{p}bc"], [f"{p}lg"]),
        n("Reshape", [f"{p}lg", f"{p}shape"], [f"{p}sc"]),  # (B, K, M)
        n("LogSoftmax", [f"{p}sc"], [f"{p}log_probs"], axis=-1),
    ]
    inits = [_t(f"{p}Wc", wc), _t(f"{p}bc", bc), _t(f"{p}shape", np.array([-1, k, M], np.int64))]
    return nodes, inits


def build(
    out_dir: str | os.PathLike,
    vocab: int = 50,
    modules: int = 5,
    k: int = 1,
    embedding: int = 16,
    hidden: int = 32,
    seed: int = 0,
    combine: str = "sum",
    selection: str = "slots",
) -> Path:
    """Write a valid random-weight recurrent bundle to ``out_dir``; returns the directory.
    ``selection`` "topk" needs ``combine`` "gate" (and the reverse)."""
    from onnx import TensorProto, helper

    if (selection == "topk") != (combine == "gate"):
        raise ValueError(f"selection {selection!r} with combine {combine!r}: 'topk' goes with 'gate' only")
    slots = 1 if selection == "topk" else k  # the controller's distributions

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    V, E, H, M = vocab, embedding, hidden, modules

    def u(*shape: int, scale: float) -> np.ndarray:
        return rng.uniform(-scale, scale, shape).astype(np.float32)

    s = 1 / np.sqrt(H)
    cells = [{"Wi": u(E, 3 * H, scale=s), "bi": u(3 * H, scale=s), "Wh": u(H, 3 * H, scale=s),
              "bh": u(3 * H, scale=s)} for _ in range(M)]
    wc, bc = u(E + H, slots * M, scale=1.0), u(slots * M, scale=0.5)
    F, I64 = TensorProto.FLOAT, TensorProto.INT64
    e_in, h_in = _io("e", F, ["B", E]), _io("h", F, ["B", H])
    graphs = {}
    graphs["embedding"] = _model(
        [helper.make_node("Gather", ["table", "tokens"], ["emb"], axis=0)],
        [_io("tokens", I64, ["B", "T"])], [_io("emb", F, ["B", "T", E])],
        [_t("table", u(V, E, scale=0.1))], "embedding")
    nodes, inits = _controller_nodes("", wc, bc, slots, M)
    graphs[f"{LAYER}.controller"] = _model(
        nodes, [e_in, h_in], [_io("log_probs", F, ["B", slots, M])], inits, "controller")
    for m in range(M):
        nodes, inits = _gru_nodes("", "e", "h", "h_new", cells[m])
        graphs[f"{LAYER}.module{m}"] = _model(
            nodes, [_io("e", F, ["R", E]), _io("h", F, ["R", H])],
            [_io("h_new", F, ["R", H])], inits, f"module{m}")
    graphs[f"{LAYER}.dense"] = _dense(cells, wc, bc, k, combine, e_in, h_in, H, selection)
    graphs["head"] = _model(
        [helper.make_node("MatMul", ["hs", "Wo"], ["z"]), helper.make_node("Add", ["z", "bo"], ["logits"])],
        [_io("hs", F, ["B", "T", H])], [_io("logits", F, ["B", "T", V])],
        [_t("Wo", u(H, V, scale=s)), _t("bo", u(V, scale=s))], "head")
    specs = bundle.save_graphs(out, graphs)
    manifest = bundle.Manifest(
        task={"name": "synthetic-lm", "kind": "language-model", "vocab": [f"w{i}" for i in range(V)],
              "eos": "w0", "unk": "w1"},
        topology="recurrent",
        stages=("embedding", LAYER, "head"),
        layers=(bundle.LayerSpec(
            name=LAYER, modules=M, k=k, combine=combine, controller=f"{LAYER}.controller",
            module_graphs=tuple(f"{LAYER}.module{m}" for m in range(M)), state="h", selection=selection),),
        dense={LAYER: f"{LAYER}.dense"},
        graphs=specs,
        opset=OPSET,
        model={"vocab_size": V, "embedding": E, "hidden": H, "modules": M, "k": k,
               "combine": combine, "selection": selection, "cell": "gru", "seed": seed},
    )
    bundle.write(out, manifest)
    return out


def _dense(cells, wc, bc, k: int, combine: str, e_in, h_in, H: int, selection: str = "slots"):
    """Every GRU cell on every row, the selected ones kept by a (B, M) mask - or, for
    "topk", weighted by their gates (zero for the modules not selected)."""
    from onnx import TensorProto, helper

    n = helper.make_node
    M = len(cells)
    inits = [_t("ax1", np.array([1], np.int64))]
    if selection == "topk":
        nodes, ci = _controller_nodes("c_", wc, bc, 1, M)
        nodes += [
            n("Squeeze", ["c_log_probs", "ax1"], ["lp"]),  # (B, M)
            n("TopK", ["lp", "kk"], ["top", "selection"], axis=-1),  # (B, k): ties to the lower id
            n("Softmax", ["top"], ["w"], axis=-1),  # the gates
            n("Shape", ["lp"], ["bm"]), n("ConstantOfShape", ["bm"], ["zeros"]),
            n("ScatterElements", ["zeros", "selection", "w"], ["mask"], axis=1),  # (B, M) gate per module
        ]
        inits += ci + [_t("kk", np.array([k], np.int64))]
    else:
        nodes, ci = _controller_nodes("c_", wc, bc, k, M)
        nodes += [
            n("ArgMax", ["c_log_probs"], ["selection"], axis=-1, keepdims=0),  # (B, K)
            n("OneHot", ["selection", "depth", "onoff"], ["onehot"], axis=-1),  # (B, K, M)
            n("ReduceMax", ["onehot"], ["mask"], axes=[1], keepdims=0),  # (B, M)
        ]
        inits += ci + [_t("depth", np.array(M, np.int64)), _t("onoff", np.array([0.0, 1.0], np.float32))]
    ys = []
    for m, w in enumerate(cells):
        nn_, ii = _gru_nodes(f"m{m}_", "e", "h", f"m{m}_y", w)
        nodes += nn_ + [n("Unsqueeze", [f"m{m}_y", "ax1"], [f"m{m}_y1"])]
        inits += ii
        ys.append(f"m{m}_y1")
    nodes += [
        n("Concat", ys, ["ys"], axis=1),  # (B, M, H)
        n("Unsqueeze", ["mask", "ax1"], ["mask1"]),  # (B, 1, M)
        n("MatMul", ["mask1", "ys"], ["s1"]), n("Squeeze", ["s1", "ax1"], ["hsum"]),  # (B, H)
    ]
    if combine == "mean":
        nodes += [n("ReduceSum", ["mask", "ax1"], ["count"], keepdims=1),
                  n("Div", ["hsum", "count"], ["h_new"])]
    else:
        nodes.append(n("Identity", ["hsum"], ["h_new"]))
    F, I64 = TensorProto.FLOAT, TensorProto.INT64
    return _model(nodes, [e_in, h_in],
                  [_io("h_new", F, ["B", H]), _io("selection", I64, ["B", k])], inits, "dense")


__all__ = ["build"]
