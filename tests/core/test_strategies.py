"""Every strategy (host, graph, fused, auto) equals the dense baseline graph row for row."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest

import modrt
from modrt._exceptions import InputError
from modrt.runtime import auto, fused, graph
from modrt.runtime.sessions import SessionConfig

DIMS = (8, 16, 8)  # MoE experts keep the width (fused); graph/host also run (8, 16, 6) below
STRATEGIES = ("host", "graph", "fused", "auto")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("k,rule", [(1, "sum"), (3, "sum"), (3, "mean"), (2, "mean")])
def test_feedforward_equals_dense(ff_bundle, check_equal, strategy, k, rule):
    model = modrt.load(ff_bundle(modules=8, k=k, dims=DIMS, combine=rule), strategy=strategy)
    for batch in (1, 2, 5, 64):  # 2 rows over 8 modules: most modules get no rows at all
        x = np.random.default_rng(batch).standard_normal((batch, DIMS[0])).astype(np.float32)
        r = check_equal(model, x, rule)
        if batch == 2:
            assert len(np.unique(r["modules"])) < 8
        assert model.strategy_for(batch) in ("host", "graph", "fused")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("k,picks", [(1, [5]), (3, [2, 2, 4]), (3, [1, 1, 1])])
def test_one_module_gets_every_row(ff_bundle, forced_weights, check_equal, strategy, k, picks):
    """One module serves every row; with K > 1 a module repeated in slots counts once."""
    w = forced_weights(6, k, DIMS, picks)
    model = modrt.load(ff_bundle(modules=6, k=k, dims=DIMS, weights=w, name=f"forced-{picks}"),
                       strategy=strategy)
    for batch in (1, 33):
        x = np.random.default_rng(batch).standard_normal((batch, DIMS[0])).astype(np.float32)
        r = check_equal(model, x, "sum")
        assert (r["modules"][:, 0] == np.array(picks)).all()


def _assert_recurrent_equals_dense(model, k: int) -> None:
    """Routed == dense row for row at batch 1, 2 and 7 (9-token sequences)."""
    for batch in (1, 2, 7):
        tok = np.random.default_rng(batch).integers(0, 40, (batch, 9))
        r, d = model.run(tokens=tok), model.run_dense(tokens=tok)
        assert r["modules"].dtype == np.int32 and r["modules"].shape == (batch, 9, 1, k)
        np.testing.assert_array_equal(r["modules"], d["modules"])
        np.testing.assert_allclose(r["logits"], d["logits"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r["h_last"], d["h_last"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["host", "graph", "auto"])
@pytest.mark.parametrize("k,rule", [(1, "sum"), (3, "mean"), (2, "sum")])
def test_recurrent_equals_dense(lm_bundle, strategy, k, rule):
    model = modrt.load(lm_bundle(modules=5, k=k, combine=rule), strategy=strategy)
    _assert_recurrent_equals_dense(model, k)


def test_graph_layer_with_and_without_if(ff_bundle, lm_bundle):
    """Both compositions (modules behind an If, or run on empty blocks) equal the dense step."""
    for bundle_dir, feeds in ((ff_bundle(modules=6, k=3, dims=DIMS), lambda B, r: {
                                   "x": r.standard_normal((B, DIMS[0])).astype(np.float32)}),
                              (lm_bundle(modules=5, k=2), lambda B, r: {
                                   "e": r.standard_normal((B, 8)).astype(np.float32),
                                   "h": np.tanh(r.standard_normal((B, 12))).astype(np.float32)})):
        model = modrt.load(bundle_dir, strategy="host")
        spec = model.manifest.layers[0]
        dense = model.sessions[model.manifest.dense[spec.name]]
        for skip in (True, False):
            sess = graph.session(graph.compose(bundle_dir, model.manifest, spec, skip_empty=skip),
                                 SessionConfig(threads=1), ["CPUExecutionProvider"], "test")
            for B in (1, 3, 20):
                f = feeds(B, np.random.default_rng(B))
                y, a = sess.run(None, f)
                y_d, a_d = dense(f)
                np.testing.assert_array_equal(a, a_d)
                np.testing.assert_allclose(y, y_d, rtol=1e-5, atol=1e-5)


def test_fused_declines_recurrent_modules(lm_bundle):
    with pytest.raises(InputError, match="strategy 'fused' cannot run layer layer0: recurrent modules"):
        modrt.load(lm_bundle(), strategy="fused")
    model = modrt.load(lm_bundle(), strategy="auto")  # auto falls back without a word
    assert model.strategy_for(1) in ("host", "graph", "graph-loop")  # by timing: any but fused


def test_width_changing_modules(ff_bundle, mlp_reference):
    d = ff_bundle(modules=6, k=2, dims=(8, 16, 6))
    with pytest.raises(InputError, match="MoE experts map D features to D features"):
        modrt.load(d, strategy="fused")
    for strategy in ("graph", "auto"):
        model = modrt.load(d, strategy=strategy)
        x = np.random.default_rng(0).standard_normal((9, 8)).astype(np.float32)
        r, dense = model.run(x=x), model.run_dense(x=x)
        np.testing.assert_array_equal(r["modules"], dense["modules"])
        np.testing.assert_allclose(r["y"], dense["y"], rtol=1e-5, atol=1e-5)


def test_fused_declines_modules_that_are_not_mlps(ff_bundle):
    model = modrt.load(ff_bundle(), strategy="host")
    ctrl = graph.load_graph(model.directory, model.manifest, model.manifest.layers[0].controller)
    assert fused.mlp_params(ctrl) is None  # MatMul, Add, Reshape, LogSoftmax: not an MLP
    params, act = fused.mlp_params(graph.load_graph(model.directory, model.manifest, "layer0.module0"))
    assert act == "relu" and params[0].shape == (8, 16) and params[2].shape == (16, 8)


def test_other_selection_rules_are_declined(ff_bundle):
    """A layer whose selection is not K independent slots (e.g. top-k of one softmax) is not
    composed: graph and fused say so in one line, auto keeps host."""
    model = modrt.load(ff_bundle(), strategy="host")
    spec = dataclasses.replace(model.manifest.layers[0], selection="topk")
    manifest = dataclasses.replace(model.manifest, layers=(spec,))
    assert "selection 'topk'" in graph.unsupported(spec, manifest, "CPUExecutionProvider")
    assert "selection 'topk'" in fused.unsupported(spec, manifest, "CPUExecutionProvider")
    for name in ("graph", "fused"):
        with pytest.raises(InputError, match=f"strategy '{name}' cannot run layer layer0: selection 'topk'"):
            auto.build(name, model.directory, manifest, spec, model.sessions, SessionConfig())
    chosen = auto.choose(model.directory, manifest, model.sessions, SessionConfig(), "auto",
                         auto.AutoConfig(cache=False))
    assert chosen["layer0"].ranges == [(None, "host")]


def test_by_batch_ranges():
    spec = types.SimpleNamespace(name="l")
    layer = types.SimpleNamespace(inputs=["x"])
    bb = auto.ByBatch(spec, auto._ranges((1, 8, 64), ["fused", "fused", "graph"]),
                      {"fused": layer, "graph": layer})
    assert bb.ranges == [(22, "fused"), (None, "graph")]
    assert [bb.strategy_for(b) for b in (1, 22, 23, 1000)] == ["fused", "fused", "graph", "graph"]
    assert bb.describe() == "fused for batch 1-22, graph for batch 23+"
    assert auto._ranges((1, 8, 64), ["host", "graph", "host"]) == [(2, "host"), (22, "graph"), (None, "host")]
    # pick() and runner() remember per batch size, in one cache; runner() prefers a layer's
    # raw session run
    fast = types.SimpleNamespace(inputs=["x"], raw=lambda feeds, out: "raw")
    bb = auto.ByBatch(spec, [(22, "fused"), (None, "graph")], {"fused": fast, "graph": layer})
    assert bb.pick(3) is fast and bb.pick(3) is fast and bb.pick(500) is layer
    assert bb.runner(3) is fast.raw and bb.runner(500) is layer and set(bb.cache) == {3, 500}
    assert bb.pick(10 ** 6) is layer and 10 ** 6 not in bb.cache
    bb.runner(10 ** 6)
    assert 10 ** 6 not in bb.cache


@pytest.mark.parametrize("k,rule", [(1, "sum"), (3, "mean")])
def test_graph_loop_over_time_equals_dense(lm_bundle, k, rule):
    """The recurrent layer as one ONNX Loop over the window (auto's graph-loop)."""
    from modrt.runtime.model import Model

    base = modrt.load(lm_bundle(modules=5, k=k, combine=rule), strategy="host")
    spec = base.manifest.layers[0]
    layer = auto.build("graph-loop", base.directory, base.manifest, spec, base.sessions, SessionConfig())
    model = Model(base.directory, base.manifest, base.sessions, "auto",
                  {spec.name: auto.fixed("graph-loop", spec, layer)})
    assert model.strategy_for(4) == "graph-loop"
    _assert_recurrent_equals_dense(model, k)
    tok = np.random.default_rng(0).integers(0, 40, (3, 10))
    first = model.run(tokens=tok[:, :4])
    second = model.run(tokens=tok[:, 4:], h=first["h_last"])
    np.testing.assert_allclose(np.concatenate([first["logits"], second["logits"]], 1),
                               model.run_dense(tokens=tok)["logits"], rtol=1e-5, atol=1e-5)
    h, a = layer({"e": np.ones((2, 8), np.float32), "h": np.zeros((2, 12), np.float32)})  # one step
    assert h.shape == (2, 12) and a.shape == (2, k)


def test_graph_loop_needs_a_recurrent_layer(ff_bundle):
    model = modrt.load(ff_bundle(), strategy="host")
    with pytest.raises(InputError, match="strategy 'graph-loop' cannot run layer layer0: a Loop over time"):
        auto.build("graph-loop", model.directory, model.manifest, model.manifest.layers[0], model.sessions,
                   SessionConfig())


def _tied_weights(modules: int, dims: tuple[int, int, int], top: list[int]):
    """Random modules; a controller that ignores x and gives the modules in ``top`` the same,
    highest logit (K=1): an exact tie, to be broken towards the lowest id."""
    from modrt import synthetic

    w = synthetic.random_weights(modules, 1, dims, seed=5)
    bc = np.linspace(-3.0, -1.0, modules).astype(np.float32)
    bc[top] = 4.0
    return synthetic.Weights(wc=np.zeros_like(w.wc), bc=bc, w1=w.w1, b1=w.b1, w2=w.w2, b2=w.b2)


@pytest.mark.parametrize("top", [[2, 4], [5, 1, 3], list(range(6))])
@pytest.mark.parametrize("strategy", ["fused", "graph", "host"])
def test_k1_ties_route_to_the_lower_module(ff_bundle, check_equal, strategy, top):
    """Equal logits: every strategy takes the lowest module id, as the dense graph's ArgMax
    (fused K=1 routes MoE by a Hardmax, whose first maximum is that same module)."""
    w = _tied_weights(6, DIMS, top)
    model = modrt.load(ff_bundle(modules=6, k=1, dims=DIMS, weights=w, name=f"tied-{top}"), strategy=strategy)
    for batch in (1, 9):
        x = np.random.default_rng(batch).standard_normal((batch, DIMS[0])).astype(np.float32)
        r = check_equal(model, x, "sum")
        assert (r["modules"] == min(top)).all()


def test_fused_k1_graph_drops_the_slot_reshape(ff_bundle, check_equal, monkeypatch):
    """K=1: controller MatMul, Add, LogSoftmax on (B, M) (its Reshape to (B, 1, M) dropped),
    then ArgMax + Cast (modules) and Hardmax (router) into MoE. Where the Reshape cannot be
    shown to be a no-op, the log-probabilities are reshaped back instead: equal results."""
    d = ff_bundle(modules=8, k=1, dims=DIMS)
    model = modrt.load(d, strategy="fused")
    spec = model.manifest.layers[0]
    experts = fused.pack(d, model.manifest, spec)
    ops = [n.op_type for n in fused.compose(d, model.manifest, spec, experts).graph.node]
    assert ops == ["MatMul", "Add", "LogSoftmax", "ArgMax", "Cast", "Hardmax", "MoE"]
    monkeypatch.setattr(fused, "_slot_reshape", lambda *args: None)
    ops = [n.op_type for n in fused.compose(d, model.manifest, spec, experts).graph.node]
    assert ops == ["MatMul", "Add", "Reshape", "LogSoftmax", "Reshape", "ArgMax", "Cast", "Hardmax", "MoE"]
    unreshaped = modrt.load(d, strategy="fused")
    for batch in (1, 5, 64):
        x = np.random.default_rng(batch).standard_normal((batch, DIMS[0])).astype(np.float32)
        a, b = check_equal(model, x, "sum"), check_equal(unreshaped, x, "sum")
        np.testing.assert_array_equal(a["y"], b["y"])


@pytest.mark.parametrize("picks", [None, [2, 2, 4], [1, 1, 1]])
def test_fused_sum_counts_distinct_modules_exactly(ff_bundle, forced_weights, picks):
    """K > 1, sum rule: MoE's mean times n, n from one Gemm over the router (entries 0 or
    -2^13) - exactly the number of distinct modules each row selected, repeats once."""
    from onnx import TensorProto, helper

    w = None if picks is None else forced_weights(6, 3, DIMS, picks)
    d = ff_bundle(modules=6, k=3, dims=DIMS, weights=w, name=None if picks is None else f"forced-{picks}")
    model = modrt.load(d, strategy="host")
    spec = model.manifest.layers[0]
    composed = fused.compose(d, model.manifest, spec, fused.pack(d, model.manifest, spec))
    ops = [n.op_type for n in composed.graph.node]
    assert ops[ops.index("MoE"):] == ["MoE", "Gemm", "Mul"]
    composed.graph.output.append(helper.make_tensor_value_info("fused/distinct", TensorProto.FLOAT, ["B", 1]))
    sess = graph.session(composed, SessionConfig(threads=1), ["CPUExecutionProvider"], "test")
    x = np.random.default_rng(3).standard_normal((200, DIMS[0])).astype(np.float32)
    _, a, n = sess.run(None, {"x": x})
    want = np.array([len(set(row)) for row in a.tolist()], np.float32)[:, None]
    np.testing.assert_array_equal(n, want)  # exact, not close
    if picks is None:
        assert {1, 2, 3} <= set(want[:, 0].tolist())  # the random rows include repeats


def test_slot_reshape_needs_proof(ff_bundle):
    """The Reshape is dropped only for a final LogSoftmax over the last axis fed by a
    (B, M) -> (B, 1, M) Reshape."""
    from onnx import helper

    d = ff_bundle(modules=8, k=1, dims=DIMS)
    model = modrt.load(d, strategy="host")
    ctrl = graph.load_graph(d, model.manifest, model.manifest.layers[0].controller)
    assert fused._slot_reshape(ctrl, "log_probs", 17, 8) is not None
    assert fused._slot_reshape(ctrl, "log_probs", 17, 7) is None  # another M
    assert fused._slot_reshape(ctrl, "log_probs", 12, 8) is None  # LogSoftmax-11 flattens from its axis
    other_axis = graph.load_graph(d, model.manifest, model.manifest.layers[0].controller)
    soft = next(n for n in other_axis.node if n.op_type == "LogSoftmax")
    del soft.attribute[:]
    soft.attribute.append(helper.make_attribute("axis", 1))
    assert fused._slot_reshape(other_axis, "log_probs", 17, 8) is None


def test_fast_path_strides_and_failure(ff_bundle):
    """Model.run's shortcut: any strides go straight to the session; an exception there is
    reported (converted as every run boundary converts), never re-run on the general path."""
    d = ff_bundle(modules=8, k=1, dims=DIMS)
    for strategy in ("fused", "graph", "host"):
        model = modrt.load(d, strategy=strategy)
        wide = np.random.default_rng(0).standard_normal((5, 2 * DIMS[0])).astype(np.float32)
        x = wide[:, ::2]
        assert not x.flags.c_contiguous
        r, ref = model.run(x=x), model.run_dense(x=np.ascontiguousarray(x))
        np.testing.assert_array_equal(r["modules"], ref["modules"])
        np.testing.assert_allclose(r["y"], ref["y"], rtol=1e-5, atol=1e-5)
        layer = model._routed["layer0"]

        def broken(feeds, out):
            raise RuntimeError("boom")

        layer.cache[5] = (layer.pick(5), broken)
        with pytest.raises(modrt.ModrtError, match=r"layer layer0 failed \(RuntimeError\): boom"):
            model.run(x=x)


def _variant(bundle_dir, name: str):
    """A model whose one layer runs auto's candidate ``name`` (e.g. fused@2) at every batch."""
    from modrt.runtime.model import Model

    base = modrt.load(bundle_dir, strategy="host")
    spec = base.manifest.layers[0]
    layer = auto.build(name, base.directory, base.manifest, spec, base.sessions, SessionConfig())
    return Model(base.directory, base.manifest, base.sessions, "auto", {spec.name: auto.fixed(name, spec, layer)})


@pytest.mark.parametrize("name", ["graph@2", "fused@2", "fused@3"])
@pytest.mark.parametrize("k,rule", [(1, "sum"), (3, "sum"), (3, "mean")])
def test_threaded_variants_equal_dense(ff_bundle, check_equal, name, k, rule):
    """auto's multi-threaded candidates route and combine as the dense graph does (MoE
    spreads the experts over its threads; the controller's kernels are the same)."""
    model = _variant(ff_bundle(modules=8, k=k, dims=DIMS, combine=rule), name)
    assert model._routed["layer0"].layers[name].session.get_session_options().intra_op_num_threads == int(name[-1])
    for batch in (1, 5, 64, 200):
        x = np.random.default_rng(batch).standard_normal((batch, DIMS[0])).astype(np.float32)
        check_equal(model, x, rule)
    assert model.strategy_for(5) == name.split("@")[0]


@pytest.mark.parametrize("name", ["graph@2", "fused@2"])
def test_threaded_variants_break_ties_to_the_lower_module(ff_bundle, check_equal, name):
    w = _tied_weights(6, DIMS, [5, 1, 3])
    model = _variant(ff_bundle(modules=6, k=1, dims=DIMS, weights=w, name="tied-[5, 1, 3]"), name)
    x = np.random.default_rng(0).standard_normal((70, DIMS[0])).astype(np.float32)
    assert (check_equal(model, x, "sum")["modules"] == 1).all()
