"""What ``modrt bench`` measures the routed runtime against (DESIGN.md §8).

Each ``make_*`` returns a callable ``f(batch_input) -> None`` that runs one inference,
or ``None`` with a reason when the peer cannot run for this bundle:

    bound    the equal-compute bound: K modules' work at that batch, no routing at all
    torch    PyTorch eager, the same weights, routed as a PyTorch user writes it
             (built in ``modrt.train.bench_peer``, found by entry-point name: the core
             never imports torch): for a synthetic bundle from its own weights, for a
             trained one (PTB, CIFAR-10) the training model from its checkpoint (``--checkpoint``)
    ort_moe  ONNX Runtime's fused ``com.microsoft.MoE`` op fed the controller's logits
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from modrt import routing
from modrt.runtime.layer import Layer
from modrt.runtime.model import Model
from modrt.runtime.sessions import SessionConfig, session_options
from modrt.synthetic import Weights

if TYPE_CHECKING:
    import onnx

Peer = Callable[[np.ndarray], object]


class BoundLayer(Layer):
    """The equal-compute bound of one modular layer: K module graphs on the whole batch,
    no controller and no combine (the state passed on is the last one's output). Which K
    rotates from call to call (and step to step), so that their weights come from memory
    as often as the routed run's do; always the same K would sit in cache and make the
    bound look better than any routing could be."""

    kind = "bound"

    def __init__(self, spec, graphs: list):
        self.spec = spec
        self.graphs = graphs
        self.inputs = list(graphs[0].input_names)
        self._turn = itertools.count()
        self._a = {}  # batch -> the (B, K) selection reported (zeros: no routing)

    def __call__(self, feeds: dict[str, np.ndarray], out: np.ndarray | None = None):
        K, n = self.spec.k, len(self.graphs)
        i = next(self._turn) * K
        for j in range(K):
            y = self.graphs[(i + j) % n](feeds)[0]
        if out is not None:
            out[...] = y
            y = out
        B = y.shape[0]
        a = self._a.get(B)
        if a is None:
            a = self._a[B] = np.zeros((B, K), np.int64)
        return y, a


def make_bound(model: Model) -> Peer:
    """K module graphs on the whole batch per modular layer (recurrent: per step), with
    the bundle's other stages, through the same ``Pipeline`` as the routed run."""
    m = model.manifest
    layers = [BoundLayer(l, [model.sessions[g] for g in l.module_graphs])
              for l in (m.layer(n) for n in model.pipeline.layer_names)]
    pipe = model.pipeline
    if m.topology == "feedforward":
        name = model.input.name

        def bound_ff(x: np.ndarray) -> None:
            pipe.feedforward(layers, x, name)

        return bound_ff

    def bound_rnn(tokens: np.ndarray) -> None:
        pipe.run_recurrent(layers, tokens, model._h0(None, tokens.shape[0]))

    return bound_rnn


def _training_peer(name: str):
    """The peer ``name`` that ``modrt.train`` registers under the ``modrt.peers`` entry-point
    group (pyproject.toml): the PyTorch peers need torch and, for checkpoints, the training
    code, which the torch-free core never imports (DESIGN.md §1-2). -> (factory | None, reason)."""
    from importlib.metadata import entry_points

    found = entry_points(group="modrt.peers", name=name)
    if not found:
        return None, "the training extra is not installed (pip install 'modrt[train]')"
    try:
        return next(iter(found)).load(), ""
    except ImportError as exc:
        return None, f"the training code does not import here ({exc})"


def make_torch(w: Weights | None, k: int, combine: str, threads: int) -> tuple[Peer | None, str]:
    """PyTorch eager from the bundle's own numpy weights (two-layer MLP modules); (None,
    reason) without them or without torch."""
    if w is None:
        return None, "modules are not two-layer MLPs"
    make, why = _training_peer("torch-mlp")
    return (None, why) if make is None else make(w, k, combine, threads)


def make_torch_checkpoint(ckpt: str, model: Model, threads: int) -> tuple[Peer | None, str]:
    """PyTorch eager on the model a training checkpoint holds (the bundle it was exported
    from); (None, reason) when the training code is not installed; the peer's own
    ModrtError when the checkpoint is not the bundle's."""
    make, why = _training_peer("torch-checkpoint")
    return (None, why) if make is None else make(ckpt, model, threads)


def moe_model(w: Weights, k: int) -> onnx.ModelProto:
    """controller logits -> com.microsoft.MoE, experts packed from the module weights.

    The MoE node and its expert layout are the ``fused`` strategy's (``fused.moe_node``).
    Here, as a peer, it is fed what a plain MoE user feeds it: the controller's logits.
    MoE softmaxes them, takes the top k and (``normalize_routing_weights=1``) renormalises
    their weights. For K=1 the one weight is 1: exactly the sum rule. For K>1 the router
    input is the sum of the K slots' log-probabilities and the experts are weighted: the
    same compute, not the same output (the ``fused`` strategy routes exactly instead).
    """
    from onnx import TensorProto

    from modrt.runtime import fused
    from modrt.runtime import graph as g
    from modrt.synthetic import OPSET, _io

    M, D, _ = w.w1.shape
    b = g.Builder(OPSET)
    zc = b.node("MatMul", ["x", b.const(w.wc)], ["zc"])
    router = b.node("Add", [zc, b.const(w.bc)], ["logits"])  # (B, K*M)
    if k > 1:
        scores = b.node("Reshape", [router, b.const(np.array([-1, k, M], np.int64))], ["scores"])  # (B, K, M)
        lp = b.node("LogSoftmax", [scores], ["lp"], axis=-1)
        router = b.reduce("ReduceSum", lp, [1], "router")  # (B, M)
    fused.moe_node(b, "x", router, fused.Experts(w.w1, w.b1, w.w2, w.b2, "relu"), k, "y")
    return b.model([_io("x", TensorProto.FLOAT, ["B", D])], [_io("y", TensorProto.FLOAT, ["B", w.w2.shape[2]])],
                   "ort_moe")


def make_ort_moe(
    w: Weights | None, k: int, config: SessionConfig, providers: list[str]
) -> tuple[Peer | None, str]:
    """A session on the fused MoE graph; (None, reason) where it cannot run."""
    if w is None:
        return None, "modules are not two-layer MLPs"
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(moe_model(w, k).SerializeToString(), session_options(config),
                                    providers=providers)
        x = np.random.default_rng(0).standard_normal((4, w.w1.shape[1]), dtype=np.float32)
        got = sess.run(None, {"x": x})[0]
    except Exception as exc:  # op missing from this build or provider: report, don't fail
        return None, f"com.microsoft.MoE unavailable: {' '.join(str(exc).split())[:200]}"
    if k == 1:  # the weight layout changed across ORT versions: check before timing it
        a = (x @ w.wc + w.bc).argmax(-1)[:, None]  # (B, 1)
        want = routing.mlp_reference(w.w1, w.b1, w.w2, w.b2, x.astype(np.float64), a, "sum")
        if not np.allclose(got, want, rtol=1e-3, atol=1e-3):
            return None, "com.microsoft.MoE disagrees with the modules (weight layout of this ORT?)"

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run(None, {"x": x})[0]

    return run, ""


__all__ = ["Peer", "make_bound", "make_torch", "make_torch_checkpoint", "make_ort_moe", "moe_model"]
