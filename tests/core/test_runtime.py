"""The routed runtime equals the dense baseline graph row for row (real ORT sessions)."""

from __future__ import annotations

import numpy as np
import pytest

import modrt
from modrt._exceptions import InputError

DIMS = (8, 16, 6)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("rule", ["sum", "mean"])
@pytest.mark.parametrize("batch", [1, 2, 5, 64])
def test_routed_equals_dense(ff_bundle, check_equal, k, rule, batch):
    model = modrt.load(ff_bundle(modules=8, k=k, dims=DIMS, combine=rule))
    x = np.random.default_rng(batch).standard_normal((batch, DIMS[0])).astype(np.float32)
    r = check_equal(model, x, rule)
    if batch == 2:  # 2 rows over 8 modules: most modules get no rows at all
        assert len(np.unique(r["modules"])) < 8


@pytest.mark.parametrize("k,picks", [(1, [5]), (3, [2, 2, 4])])
def test_one_module_gets_every_row(ff_bundle, forced_weights, check_equal, k, picks):
    w = forced_weights(6, k, DIMS, picks)
    model = modrt.load(ff_bundle(modules=6, k=k, dims=DIMS, weights=w, name=f"forced-k{k}"))
    x = np.random.default_rng(0).standard_normal((33, DIMS[0])).astype(np.float32)
    r = check_equal(model, x, "sum")
    assert (r["modules"][:, 0] == np.array(picks)).all()


def test_float64_input_is_cast(ff_bundle):
    model = modrt.load(ff_bundle())
    x = np.random.default_rng(0).standard_normal((4, 8))
    np.testing.assert_allclose(model.run(x=x)["y"], model.run(x=x.astype(np.float32))["y"])


@pytest.mark.parametrize("k,rule", [(1, "sum"), (3, "mean"), (2, "sum")])
def test_recurrent_routed_equals_dense(lm_bundle, k, rule):
    model = modrt.load(lm_bundle(modules=5, k=k, combine=rule))
    tok = np.random.default_rng(k).integers(0, 40, (6, 9))
    r, d = model.run(tokens=tok), model.run_dense(tokens=tok)
    assert r["logits"].shape == (6, 9, 40) and r["modules"].shape == (6, 9, 1, k)
    assert r["modules"].dtype == np.int32 and r["next_token"].dtype == np.int64
    np.testing.assert_array_equal(r["next_token"], r["logits"].argmax(-1))
    np.testing.assert_array_equal(r["modules"], d["modules"])
    np.testing.assert_allclose(r["logits"], d["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r["h_last"], d["h_last"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_recurrent_topk_gate_equals_dense(lm_bundle, k):
    """Noisy top-k's inference form: the k most probable modules, weighted by the softmax of
    their log-probabilities - routed (host) equals the dense graph's TopK + ScatterElements."""
    model = modrt.load(lm_bundle(modules=6, k=k, combine="gate", selection="topk"))
    spec = model.manifest.layers[0]
    assert (spec.selection, spec.combine, model.strategy_for(4)) == ("topk", "gate", "host")
    tok = np.random.default_rng(k).integers(0, 40, (7, 11))
    r, d = model.run(tokens=tok), model.run_dense(tokens=tok)
    assert r["modules"].shape == (7, 11, 1, k)
    np.testing.assert_array_equal(r["modules"], d["modules"])
    assert len(np.unique(r["modules"])) > k  # the rows do not all pick the same modules
    assert (np.diff(np.sort(r["modules"], -1), axis=-1) != 0).all()  # k distinct modules per row
    np.testing.assert_allclose(r["logits"], d["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r["h_last"], d["h_last"], rtol=1e-5, atol=1e-5)


def test_topk_bundle_needs_the_gate():
    from modrt import synthetic_lm

    with pytest.raises(ValueError, match="'topk' goes with 'gate' only"):
        synthetic_lm.build("unused", selection="topk", combine="sum")


def test_recurrent_state_carries_across_windows(lm_bundle):
    model = modrt.load(lm_bundle())
    tok = np.random.default_rng(0).integers(0, 40, (3, 10))
    whole = model.run(tokens=tok)
    first = model.run(tokens=tok[:, :4])
    second = model.run(tokens=tok[:, 4:], h=first["h_last"])
    np.testing.assert_allclose(np.concatenate([first["logits"], second["logits"]], 1), whole["logits"],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(model.zero_state(3), np.zeros((3, 12), np.float32))


def test_batch_one_recurrent(lm_bundle):
    model = modrt.load(lm_bundle(k=2))
    tok = np.array([[3, 1, 4, 1, 5]])
    np.testing.assert_allclose(model.run(tokens=tok)["logits"], model.run_dense(tokens=tok)["logits"],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens,match", [
    (np.zeros((2, 3), np.float32), "must be integers"),
    (np.zeros(5, np.int64), "2-D"),
    (np.full((1, 2), 40), r"in \[0, 40\)"),
    (np.full((1, 2), -1), r"in \[0, 40\)"),
])
def test_bad_tokens(lm_bundle, tokens, match):
    with pytest.raises(InputError, match=match):
        modrt.load(lm_bundle()).run(tokens=tokens)


def test_bad_state_and_inputs(lm_bundle, ff_bundle):
    lm = modrt.load(lm_bundle())
    with pytest.raises(InputError, match=r"shape \(2, 12\)"):
        lm.run(tokens=np.zeros((2, 3), np.int64), h=np.zeros((2, 5)))
    with pytest.raises(InputError, match="tokens="):
        lm.run(x=np.zeros((2, 3)))
    ff = modrt.load(ff_bundle())
    with pytest.raises(InputError, match=r"shape \[-1, 8\]"):
        ff.run(x=np.zeros((2, 3), np.float32))
    with pytest.raises(InputError, match=r"takes .x. \(float32 \[-1, 8\]\); got \[.image.\]"):
        ff.run(image=np.zeros((2, 8), np.float32))
    with pytest.raises(InputError, match="not tokens="):
        ff.run(tokens=np.zeros((2, 3), np.int64))


def test_model_reports_provider_and_manifest(ff_bundle):
    model = modrt.load(ff_bundle(), provider="cpu", threads=1)
    assert model.provider == "CPUExecutionProvider"
    assert model.manifest.layers[0].modules == 6
    assert "M=6 K=1" in repr(model)


def test_unknown_strategy(ff_bundle):
    with pytest.raises(InputError, match="strategy 'warp' unknown; choose one of auto, host, graph, fused"):
        modrt.load(ff_bundle(), strategy="warp")


def test_global_thread_pool_in_a_subprocess(ff_bundle):
    """ORT's global pool is process-wide: try it where it cannot leak into other tests."""
    import subprocess
    import sys

    code = (
        "import numpy as np, modrt\n"
        f"m = modrt.load({str(ff_bundle())!r}, thread_pool='global', threads=1)\n"
        "x = np.ones((3, 8), np.float32)\n"
        "assert np.allclose(m.run(x=x)['y'], m.run_dense(x=x)['y'], atol=1e-5)\n"
        "try:\n"
        f"    modrt.load({str(ff_bundle())!r})\n"
        "except modrt.ProviderError as e:\n"
        "    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: this process already uses ONNX Runtime's global thread pool" in out.stdout
