"""``modrt export-triton``: the repository's configs against Triton's own schema and the
ONNX graphs, the KServe manifests, the routing model's answers, and (``slow``) a real
``tritonserver`` serving the repository.

The routing model (``model.py``) is Triton Python-backend code. Most tests here run it in
this process (the ``triton_router`` fixture: a small stand-in for
``triton_python_backend_utils`` whose BLS calls run the repository's own ``model.onnx``
files with ONNX Runtime), so the router's routing is checked on every CI run; ``test_real_tritonserver`` runs the same
repository in a real Triton (the ``nvidia-pytriton`` wheel's server) where one is set up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

import modrt
from modrt._exceptions import BundleError, InputError
from modrt.triton import Options, validate, write
from modrt.triton.repository import MODELS

pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] is not installed")


def _repo(bundle: Path, tmp_path: Path, **opts) -> Path:
    repo = tmp_path / "repo"
    write(bundle, repo, Options(**opts))
    return repo


def _config(repo: Path, model: str):
    from modrt.triton.repository import parse

    return parse(repo / MODELS / model / "config.pbtxt")


# --- configs ------------------------------------------------------------------------


def test_every_config_parses_and_matches_its_graph(ff_bundle, lm_bundle, tmp_path):
    for i, b in enumerate([ff_bundle(modules=4, k=2), lm_bundle(modules=3, k=1)]):
        repo = _repo(b, tmp_path / str(i))
        m = modrt.bundle.load(b)
        models = sorted(p.name for p in (repo / MODELS).iterdir())
        router = m.task["name"]
        assert models == sorted([*m.graphs, router])
        assert validate(repo) == len(m.graphs) + 1  # every config parsed, ONNX io checked
        for g, spec in m.graphs.items():
            cfg = _config(repo, g)
            assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 64
            assert [i.name for i in cfg.input] == [t.name for t in spec.inputs]
            assert cfg.dynamic_batching is not None and cfg.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_CPU
            params = {k: v.string_value for k, v in cfg.parameters.items()}
            assert params == {"intra_op_thread_count": "1", "inter_op_thread_count": "1"}
            assert (repo / MODELS / g / "1" / "model.onnx").read_bytes() == (b / spec.file).read_bytes()
        cfg = _config(repo, router)
        assert cfg.backend == "python"
        sig = modrt.load(b, provider="cpu", strategy="host").signature
        assert [t.name for t in cfg.input] == [t.name for t in sig.inputs]
        assert [t.name for t in cfg.output] == [t.name for t in sig.outputs]
        for t, s in zip(cfg.output, sig.outputs, strict=True):
            assert list(t.dims) == list(s.shape[1:]) and pb2.DataType.Name(t.data_type) == {
                "float32": "TYPE_FP32", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}[s.dtype]
        if m.topology == "recurrent":
            assert [t.optional for t in cfg.input] == [False, True]  # h may be left out


def test_validate_names_a_config_that_differs_from_its_graph(ff_bundle, tmp_path):
    repo = _repo(ff_bundle(modules=3), tmp_path)
    p = repo / MODELS / "layer0.module1" / "config.pbtxt"
    p.write_text(p.read_text().replace("dims: [ 8 ]", "dims: [ 9 ]", 1))
    with pytest.raises(BundleError, match="layer0.module1.*differ from the ONNX graph"):
        validate(repo)
    p.write_text(p.read_text() + "\nno_such_field: 3\n")
    with pytest.raises(BundleError, match="not a valid Triton ModelConfig"):
        validate(repo)


def test_tensorrt_block_gpu_instances_and_profiles(lm_bundle, tmp_path):
    repo = _repo(lm_bundle(modules=3), tmp_path, tensorrt=True, fp16=True, max_batch=32, max_seq=128, instances=2)
    cfg = _config(repo, "head")
    assert cfg.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_GPU and cfg.instance_group[0].count == 2
    (acc,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    p = dict(acc.parameters)
    assert acc.name == "tensorrt" and p["precision_mode"] == "FP16" and p["trt_engine_cache_enable"] == "1"
    assert p["trt_profile_min_shapes"] == "hs:1x1x12" and p["trt_profile_max_shapes"] == "hs:32x128x12"
    assert _config(repo, "synthetic-lm").instance_group[0].kind == pb2.ModelInstanceGroup.KIND_CPU  # the router
    with pytest.raises(InputError, match="--fp16"):
        Options(fp16=True)


def test_refuses_a_non_empty_repo_and_replaces_its_own_with_force(ff_bundle, tmp_path):
    b = ff_bundle(modules=3)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        write(b, other)
    with pytest.raises(InputError, match="not a repository modrt wrote"):
        write(b, other, force=True)
    assert (other / "keep.txt").read_text() == "x"
    repo = _repo(b, tmp_path)
    (repo / MODELS / "stale").mkdir()
    write(b, repo, Options(name="mlp"), force=True)
    assert not (repo / MODELS / "stale").exists() and (repo / MODELS / "mlp" / "config.pbtxt").is_file()
    with pytest.raises(InputError, match="also a graph's name"):
        write(b, tmp_path / "r3", Options(name="layer0.controller"))
    assert not (tmp_path / "r3").exists()


def test_kserve_manifests(ff_bundle, tmp_path):
    repo = tmp_path / "repo"
    write(ff_bundle(modules=3), repo, Options(storage_uri="gs://bucket/repo/models", bundle_uri="gs://bucket/b",
                                              image="registry.example/modrt:1"))
    t = yaml.safe_load((repo / "kserve" / "triton.yaml").read_text())
    assert t["apiVersion"] == "serving.kserve.io/v1beta1" and t["kind"] == "InferenceService"
    model = t["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "triton"} and model["protocolVersion"] == "v2"
    assert model["storageUri"] == "gs://bucket/repo/models"
    s = yaml.safe_load((repo / "kserve" / "modrt.yaml").read_text())
    (c,) = s["spec"]["predictor"]["containers"]
    assert c["image"] == "registry.example/modrt:1" and c["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    assert c["args"][:5] == ["/mnt/models", "--host", "0.0.0.0", "--port", "8080"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert {"name": "STORAGE_URI", "value": "gs://bucket/b"} in c["env"]
    docker = (repo / "kserve" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["modrt", "serve"]' in docker and "EXPOSE 8080" in docker


def test_cli_help_and_one_line_errors(ff_bundle, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "modrt", "export-triton", *args], capture_output=True,
                              text=True, timeout=120)

    p = run("--help")
    assert p.returncode == 0 and "--recurrent" in p.stdout and "BLS" in p.stdout
    b = ff_bundle(modules=3)
    for args, needle in ([str(tmp_path / "nope"), str(tmp_path / "r")], "not a modrt bundle"), \
                        ([str(b), str(tmp_path / "r"), "--fp16"], "--tensorrt"):
        p = run(*args)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and needle in lines[0], p.stderr
    p = run(str(b), str(tmp_path / "r"))
    assert p.returncode == 0 and "configs parsed as Triton ModelConfig" in p.stdout, p.stderr
    p = run(str(b), str(tmp_path / "r"))
    assert p.returncode == 1 and "pass --force" in p.stderr


# --- the routing model, in-process --------------------------------------------------


def _check_like_runtime(got: dict[str, np.ndarray], ref: dict) -> None:
    for name, v in ref.items():
        v = np.asarray(v)
        if name == "h_last" and v.ndim == 2:
            v = v[:, None]  # one layer: run() gives (B, H), the signature (B, L, H)
        if v.dtype.kind == "f":
            np.testing.assert_allclose(got[name], v, rtol=1e-5, atol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(got[name], v, err_msg=name)
        assert got[name].dtype == v.dtype, name


@pytest.mark.parametrize("k,combine", [(1, "sum"), (2, "mean")])
def test_router_feedforward_equals_runtime_and_calls_only_selected_modules(ff_bundle, tmp_path, triton_router,
                                                                           k, combine):
    b = ff_bundle(modules=5, k=k, combine=combine)
    repo = _repo(b, tmp_path)
    router = triton_router(repo, "synthetic")
    model = modrt.load(b, provider="cpu", strategy="host")
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((n, 8)).astype(np.float32) for n in (1, 6, 3)]
    resps = router.infer(*[{"x": x} for x in xs])
    for x, resp in zip(xs, resps, strict=True):
        _check_like_runtime(router.outputs(resp), model.run(x=x))
    a = np.concatenate([router.outputs(r)["modules"] for r in resps])[:, 0]  # (B, K)
    distinct = Counter(m for row in a for m in set(row.tolist()))
    assert {m: router.calls[f"layer0.module{m}"] for m in range(5)} == {m: distinct[m] for m in range(5)}
    assert router.metrics == {("layer0", m): distinct[m] for m in range(5)}
    assert router.calls["layer0.dense"] == 0 and router.calls["layer0.controller"] == 10


@pytest.mark.parametrize("mode", ["local", "bls"])
@pytest.mark.parametrize("selection", ["slots", "topk"])
def test_router_recurrent_equals_runtime(lm_bundle, tmp_path, triton_router, mode, selection):
    b = lm_bundle(modules=4, k=2, combine="gate" if selection == "topk" else "sum", selection=selection)
    repo = _repo(b, tmp_path, recurrent=mode)
    router = triton_router(repo, "synthetic-lm")
    model = modrt.load(b, provider="cpu", strategy="host")
    rng = np.random.default_rng(1)
    toks = rng.integers(0, 40, (3, 9)).astype(np.int64)
    h = rng.standard_normal((3, 1, 12)).astype(np.float32)
    out = router.outputs(router.infer({"tokens": toks})[0])
    _check_like_runtime(out, model.run(tokens=toks))
    out = router.outputs(router.infer({"tokens": toks, "h": h})[0])
    _check_like_runtime(out, model.run(tokens=toks, h=h[:, 0]))
    assert sum(router.metrics.values()) > 0
    hops = sum(router.calls[f"layer0.module{m}"] for m in range(4)) + router.calls["layer0.controller"]
    assert (hops == 0) == (mode == "local")  # local: the recurrent layer never leaves the router


def test_router_answers_each_request_or_its_error(lm_bundle, tmp_path, triton_router):
    b = lm_bundle(modules=3)
    router = triton_router(_repo(b, tmp_path), "synthetic-lm")
    model = modrt.load(b, provider="cpu", strategy="host")
    good = np.array([[1, 2, 3]], np.int64)
    r = router.infer({"tokens": good}, {"tokens": np.array([[1, 99]], np.int64)},
               {"tokens": np.array([[4, 5]], np.int64)})
    _check_like_runtime(router.outputs(r[0]), model.run(tokens=good))
    assert r[1].has_error() and "[0, 40)" in r[1].error().message()
    assert not r[2].has_error()


# --- a real tritonserver ---------------------------------------------------------------


def _triton_python() -> str | None:
    """The interpreter of a virtualenv with nvidia-pytriton (numpy<2, onnxruntime):
    $MODRT_TRITON_PYTHON, or .triton-venv/ in the checkout."""
    p = os.environ.get("MODRT_TRITON_PYTHON") or str(Path(__file__).resolve().parents[2] / ".triton-venv/bin/python")
    return p if Path(p).is_file() else None


@pytest.mark.slow
def test_real_tritonserver(ff_bundle, lm_bundle, tmp_path):
    """Start the nvidia-pytriton wheel's tritonserver with the repository (ONNX graphs as
    Python-backend models running ONNX Runtime: that server has no onnxruntime backend;
    the router unchanged), call it over HTTP and gRPC with tritonclient, and check the
    outputs equal modrt's runtime, only the selected modules got rows, the counters moved."""
    python = _triton_python()
    if python is None:
        pytest.skip("no Triton environment: python -m venv .triton-venv && .triton-venv/bin/pip install "
                    "nvidia-pytriton 'numpy<2' onnxruntime (or set MODRT_TRITON_PYTHON)")
    import tritonclient.grpc as tg
    import tritonclient.http as th

    from modrt.triton.server import TritonServer

    ff, lm = ff_bundle(modules=5, k=2, combine="mean"), lm_bundle(modules=4, k=1)
    repo = tmp_path / "repo"
    write(ff, repo, Options(onnx_backend="python", name="mlp", prefix="mlp."))
    write(lm, tmp_path / "repo-lm", Options(onnx_backend="python", recurrent="bls"))
    for p in (tmp_path / "repo-lm" / MODELS).iterdir():  # one repository, two bundles
        p.rename(repo / MODELS / p.name)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 8)).astype(np.float32)
    toks = rng.integers(0, 40, (2, 6)).astype(np.int64)
    with TritonServer(repo, python=python, log=tmp_path / "triton.log") as srv:
        for client_mod, url in ((th, srv.http_url), (tg, srv.grpc_url)):
            c = client_mod.InferenceServerClient(url)
            i = client_mod.InferInput("x", list(x.shape), "FP32")
            i.set_data_from_numpy(x)
            r = c.infer("mlp", [i])
            got = {n: r.as_numpy(n) for n in ("y", "modules")}
            _check_like_runtime(got, modrt.load(ff, provider="cpu", strategy="host").run(x=x))
            i = client_mod.InferInput("tokens", list(toks.shape), "INT64")
            i.set_data_from_numpy(toks)
            r = c.infer("synthetic-lm", [i])
            got = {n: r.as_numpy(n) for n in ("logits", "next_token", "modules", "h_last")}
            _check_like_runtime(got, modrt.load(lm, provider="cpu", strategy="host").run(tokens=toks))
        metrics = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
    counts = {}
    for line in metrics.splitlines():
        if line.startswith("nv_inference_count{"):
            counts[line.split('model="')[1].split('"')[0]] = int(float(line.rsplit(" ", 1)[1]))
    rows = {line.split('module="')[1].split('"')[0]: int(float(line.rsplit(" ", 1)[1]))
            for line in metrics.splitlines() if line.startswith("modrt_module_rows_total{") and 'model="mlp"' in line}
    sel = modrt.load(ff, provider="cpu", strategy="host").run(x=x)["modules"][:, 0]
    distinct = Counter(m for row in sel for m in set(row.tolist()))
    # two calls (HTTP, gRPC) of 7 rows: each module got exactly its selected rows, twice
    assert {m: counts[f"mlp.layer0.module{m}"] for m in range(5)} == {m: 2 * distinct[m] for m in range(5)}
    assert rows == {str(m): 2 * distinct[m] for m in range(5)}
    assert counts["mlp.layer0.dense"] == 0 and counts["mlp"] == 14
    assert counts["layer0.controller"] == 2 * 2 * 6  # bls: one controller call per time step, rows 2
    assert json.loads((repo / ".modrt-triton").read_text())["router"] == "mlp"
