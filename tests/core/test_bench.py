"""``modrt bench``: the JSON contract (DESIGN.md §8), the peers' parity, CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import modrt
from modrt import bench, peers, synthetic
from modrt.cli import cli
from modrt.runtime.sessions import SessionConfig

STAT_KEYS = {"p50_us", "p90_us", "p95_us", "p99_us", "infer_per_s"}
FAST = ["--seconds", "0.02", "--warmup", "1", "-q"]


def test_synthetic_json_has_the_contract_keys(tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(cli, ["bench", "--synthetic", "--modules", "4", "--k", "2", "--dims", "8,16,8",
                                   "--batch", "1,3", "--no-torch", "--json", str(out), *FAST])
    assert res.exit_code == 0, res.output
    assert "dense/routed" in res.output and "routed/bound" in res.output
    report = json.loads(out.read_text())
    assert set(report) == {"modrt_version", "onnxruntime", "provider", "threads", "config", "results"}
    assert report["provider"] == "CPUExecutionProvider" and report["threads"] >= 1
    c = report["config"]
    assert (c["modules"], c["k"], c["dims"]) == (4, 2, [8, 16, 8])
    assert [r["batch"] for r in report["results"]] == [1, 3]
    for r in report["results"]:
        assert set(r) == {"batch", "routed", "dense", "bound", "torch", "ort_moe", "strategy"}
        assert r["strategy"] in ("host", "graph", "fused") and r["torch"] is None
        for v in ("routed", "dense", "bound", "ort_moe"):
            assert set(r[v]) == STAT_KEYS
            assert 0 < r[v]["p50_us"] <= r[v]["p90_us"] <= r[v]["p95_us"] <= r[v]["p99_us"]
    assert c["skipped"] == {"torch": "disabled"}
    assert all(d < 1e-4 for d in c["parity_max_abs_diff"].values())


def test_recurrent_bundle_reports_tokens_per_s(lm_bundle):
    report = bench.run(lm_bundle(), bench.BenchConfig(batches=(2,), seq=5, seconds=0.02, warmup=1),
                       progress=False)
    r = report["results"][0]
    assert r["torch"] is None and r["ort_moe"] is None
    assert set(r["routed"]) == STAT_KEYS | {"tokens_per_s"}
    assert r["routed"]["tokens_per_s"] == pytest.approx(r["routed"]["infer_per_s"] * 5, rel=1e-3)
    assert report["config"]["seq"] == 5 and report["config"]["topology"] == "recurrent"
    assert "tokens/s" in bench.format_table(report)


@pytest.mark.parametrize("args,msg", [
    ([], "give a bundle directory or --synthetic"),
    (["/no/such/bundle"], "no such bundle directory"),
    (["--synthetic", "--dims", "8,8"], "--dims must be 3 positive"),
    (["--synthetic", "--batch", "1,x"], "--batch must be comma-separated integers"),
    (["--synthetic", "--modules", "2", "--k", "3"], "need 1 <= --k (3) <= --modules (2)"),
])
def test_user_errors_are_one_red_line(args, msg):
    res = CliRunner().invoke(cli, ["bench", *args, *FAST])
    assert res.exit_code == 1, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and msg in errors[0], res.output
    assert "Traceback" not in res.output


def test_ort_moe_peer_equals_dense_for_k1(ff_bundle):
    d = ff_bundle(modules=5, k=1, dims=(8, 16, 8))
    model = modrt.load(d)
    w = synthetic.read_weights(d, model.manifest)
    fn, why = peers.make_ort_moe(w, 1, SessionConfig(threads=1), ["CPUExecutionProvider"])
    if fn is None:
        pytest.skip(why)
    x = np.random.default_rng(0).standard_normal((9, 8)).astype(np.float32)
    np.testing.assert_allclose(fn(x), model.run_dense(x=x)["y"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,rule", [(1, "sum"), (3, "mean")])
def test_torch_peer_equals_dense(ff_bundle, k, rule):
    pytest.importorskip("torch")
    d = ff_bundle(modules=5, k=k, dims=(8, 16, 8), combine=rule)
    model = modrt.load(d)
    fn, why = peers.make_torch(synthetic.read_weights(d, model.manifest), k, rule, 1)
    assert fn is not None, why
    x = np.random.default_rng(1).standard_normal((9, 8)).astype(np.float32)
    np.testing.assert_allclose(fn(x), model.run_dense(x=x)["y"], rtol=1e-5, atol=1e-5)


def test_bound_rotates_over_modules(ff_bundle):
    model = modrt.load(ff_bundle(modules=4, k=1, dims=(8, 16, 8)))
    calls = []
    for g in model.manifest.layers[0].module_graphs:
        graph = model.sessions[g]
        graph._run = (lambda name: lambda outs, feeds, opts: calls.append(name) or [np.zeros((2, 8), np.float32)])(g)
    bound = peers.make_bound(model)
    for _ in range(5):
        bound(np.zeros((2, 8), np.float32))
    assert calls == [f"layer0.module{i}" for i in (0, 1, 2, 3, 0)]


def test_measure_interleaves_and_respects_minimum():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    cfg = bench.BenchConfig(seconds=1e-9, block=1e-9, warmup=0, min_iters=3)
    samples = bench.measure(fns, cfg)
    assert len(samples["a"]) == 3 and len(samples["b"]) == 3  # the budget is spent at once
    assert order[:2] == ["a", "b"]  # round robin, not all of a first
