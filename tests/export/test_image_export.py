"""CIFAR-10 bundles: export, routed == dense == PyTorch through several modular layers (also
when a module gets no rows or every row), eval from the bundle alone, bench, and serving
images to tritonclient."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import modrt
from modrt.data import cifar10
from modrt.evaluate import accuracy
from modrt.export.exporter import export
from modrt.train import checkpoint
from modrt.train.config import ImageModelConfig, TrainConfig
from modrt.train.model import greedy_policy
from modrt.train.trainer import Trainer

N_TRAIN, N_TEST = 40, 30


def tiny_cifar(seed: int = 0) -> cifar10.CIFAR10:
    rng = np.random.default_rng(seed)

    def split(n):
        labels = (np.arange(n) % 10).astype(np.int64)
        base = (labels * 25).astype(np.int16)[:, None, None, None]
        return np.clip(base + rng.integers(-40, 40, (n, 32, 32, 3)), 0, 255).astype(np.uint8), labels

    tr, te = split(N_TRAIN), split(N_TEST)
    return cifar10.CIFAR10(tr[0], tr[1], te[0], te[1], cifar10.CLASSES, Path("tiny"))


CONFIGS = {
    "em-sum": {"method": "em", "modules": 3, "k": 1},
    # controllers reading a grid of their input (pooling inside the controller graphs)
    "em-mean-k2": {"method": "em", "modules": 4, "k": 2, "combine": "mean", "controller_pool": 2},
    "noisy-topk": {"method": "noisy-topk", "modules": 3, "k": 2, "combine": "gate", "controller_pool": 4},
    "dense": {"method": "dense", "modules": 1, "k": 1},
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def bundle(request, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    data = tiny_cifar()
    mp.setattr(cifar10, "load", lambda *a, **k: data)
    run = tmp_path_factory.mktemp("run")
    cfg = ImageModelConfig(channels=(4, 6, 4), **CONFIGS[request.param])
    Trainer(cfg, TrainConfig(device="cpu", batch_size=16, samples=3, steps=4, log_every=2), data, run,
            progress=False).fit()
    out = run / "bundle"
    manifest = export(run / "ckpt.pt", out, progress=False, parity_images=N_TEST)
    yield request.param, manifest, out, run / "ckpt.pt", data
    mp.undo()


def test_manifest_records_the_image_and_every_graph(bundle):
    name, m, out, _, _ = bundle
    assert m.topology == "feedforward" and m.stages == ("layer0", "pool0", "layer1", "pool1", "layer2", "head")
    assert [l.name for l in m.layers] == ["layer0", "layer1", "layer2"]
    assert m.task["kind"] == "classification" and m.task["classes"] == list(cifar10.CLASSES)
    assert m.task["image"]["mean"] == list(cifar10_mean()) and m.task["image"]["input"] == "image"
    M = CONFIGS[name]["modules"]
    assert len(m.graphs) == 3 * (M + 2) + 3  # per layer: controller, modules, dense; 2 pools, head
    assert m.graphs["layer0.module0"].inputs[0].shape == (-1, 3, 32, 32)
    assert m.graphs["layer1.module0"].outputs[0].shape == (-1, 6, 16, 16)
    p = m.parity
    assert p["images"] == N_TEST and p["routing_agreement"] == 1.0
    assert p["acc_routed"] == p["acc_torch"] == p["acc_dense"]
    assert p["logits_max_abs_diff_routed"] < 1e-4 and p["logits_max_abs_diff_dense"] < 1e-4


def cifar10_mean():
    from modrt.train.config import CIFAR10_MEAN

    return CIFAR10_MEAN


def _torch(ckpt: Path, x: np.ndarray):
    model, _ = checkpoint.load_model(ckpt)
    with torch.no_grad():
        o = model(torch.from_numpy(x), greedy_policy())
    return o.logits.numpy(), o.a.permute(1, 0, 2).numpy()


@pytest.mark.parametrize("batch", [1, 2, 7, 64])
def test_routed_equals_dense_equals_pytorch(bundle, batch):
    _, m, out, ckpt, _ = bundle
    x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    rt = modrt.load(out, provider="cpu", threads=1)
    r, d = rt.run(image=x), rt.run_dense(image=x)
    lt, at = _torch(ckpt, x)
    assert r["modules"].shape == (batch, 3, m.layers[0].k) and r["modules"].dtype == np.int32
    np.testing.assert_array_equal(r["modules"], at)
    np.testing.assert_array_equal(d["modules"], at)
    np.testing.assert_allclose(r["logits"], lt, atol=1e-4)
    np.testing.assert_allclose(d["logits"], lt, atol=1e-4)
    np.testing.assert_array_equal(r["label"], lt.argmax(1))


def test_a_module_with_every_row_and_modules_with_none(tmp_path):
    """A controller forced onto module 1 in layer 1: it gets every row, the others none."""
    data = tiny_cifar()
    mp = pytest.MonkeyPatch()
    mp.setattr(cifar10, "load", lambda *a, **k: data)
    try:
        cfg = ImageModelConfig(channels=(4, 4), modules=3, k=1)
        Trainer(cfg, TrainConfig(device="cpu", batch_size=16, samples=2, steps=1), data, tmp_path / "r",
                progress=False).fit()
        ckpt = checkpoint.load(tmp_path / "r" / "ckpt.pt")
        ckpt["model"]["layers.1.controller.bias"] = torch.tensor([0.0, 50.0, 0.0])
        checkpoint.save(tmp_path / "r" / "ckpt.pt", {k: v for k, v in ckpt.items()
                                                      if k not in ("format", "version", "modrt_version")})
        export(tmp_path / "r" / "ckpt.pt", tmp_path / "b", progress=False, parity_images=N_TEST)
    finally:
        mp.undo()
    x = np.random.default_rng(0).standard_normal((9, 3, 32, 32)).astype(np.float32)
    rt = modrt.load(tmp_path / "b", provider="cpu", threads=1)
    r, d = rt.run(image=x), rt.run_dense(image=x)
    assert (r["modules"][:, 1, 0] == 1).all()
    lt, _ = _torch(tmp_path / "r" / "ckpt.pt", x)
    np.testing.assert_allclose(r["logits"], lt, atol=1e-4)
    np.testing.assert_allclose(d["logits"], lt, atol=1e-4)


def test_eval_accuracy_from_the_bundle_equals_pytorch(bundle):
    _, _, out, ckpt, data = bundle
    rt = modrt.load(out, provider="cpu", threads=1)
    res = accuracy(rt, data.test_images, data.test_labels, batch=7)
    x = cifar10.normalise(data.test_images, cifar10_mean(), ImageModelConfig().std)
    lt, _ = _torch(ckpt, x)
    assert res["acc"] == float((lt.argmax(1) == data.test_labels).mean())
    assert res["images"] == N_TEST and len(res["module_usage"]) == 3


def test_bench_measures_an_image_bundle(bundle):
    from modrt.bench.report import run
    from modrt.bench.timing import BenchConfig

    _, _, out, ckpt, _ = bundle
    cfg = BenchConfig(batches=(1, 4), seconds=0.05, block=0.02, inputs=2, warmup=1, min_iters=2, threads=1,
                      provider="cpu")
    rep = run(out, cfg, progress=False)
    assert [r["batch"] for r in rep["results"]] == [1, 4]
    for r in rep["results"]:
        assert r["routed"]["p50_us"] > 0 and r["dense"]["p50_us"] > 0 and r["bound"]["p50_us"] > 0
    assert "--checkpoint" in rep["config"]["skipped"]["torch"]
    rep = run(out, cfg, progress=False, checkpoint=ckpt)  # PyTorch eager on the model it came from
    assert "torch" not in rep["config"]["skipped"]
    assert all(r["torch"]["p50_us"] > 0 for r in rep["results"])


def test_bench_refuses_a_checkpoint_the_bundle_did_not_come_from(bundle, tmp_path):
    from modrt._exceptions import InputError
    from modrt.bench.report import run
    from modrt.bench.timing import BenchConfig

    _, _, out, _, data = bundle
    mp = pytest.MonkeyPatch()
    mp.setattr(cifar10, "load", lambda *a, **k: data)
    try:
        Trainer(ImageModelConfig(channels=(4, 6, 4), method="dense", modules=1, k=1),
                TrainConfig(device="cpu", batch_size=16, steps=1, seed=7), data, tmp_path, progress=False).fit()
    finally:
        mp.undo()
    with pytest.raises(InputError, match="not the checkpoint this bundle was exported from|does not take"):
        run(out, BenchConfig(batches=(1,), seconds=0.02, provider="cpu"), progress=False,
            checkpoint=tmp_path / "ckpt.pt")


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_classifies_images(bundle, binary):
    tc = pytest.importorskip("tritonclient.http")
    from modrt.serve.batcher import BatchConfig
    from modrt.serve.dataplane import DataPlane
    from tests.serve.conftest import ServerThread

    _, _, out, ckpt, data = bundle
    rt = modrt.load(out, provider="cpu", threads=1)
    x = cifar10.normalise(data.test_images[:5], cifar10_mean(), ImageModelConfig().std)
    with ServerThread(DataPlane(rt, "cifar", BatchConfig(max_batch=8, max_queue_delay_us=2000))) as s:
        with tc.InferenceServerClient(s.url.removeprefix("http://")) as client:
            meta = client.get_model_metadata("cifar")
            assert meta["inputs"][0] == {"name": "image", "datatype": "FP32", "shape": [-1, 3, 32, 32]}
            inp = tc.InferInput("image", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            outs = [tc.InferRequestedOutput(n, binary_data=binary) for n in ("logits", "label", "modules")]
            res = client.infer("cifar", [inp], outputs=outs)
            bad = tc.InferInput("image", [1, 3, 16, 16], "FP32")
            bad.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
            with pytest.raises(Exception, match="shape"):
                client.infer("cifar", [bad])
            nan = tc.InferInput("image", [1, 3, 32, 32], "FP32")
            nan.set_data_from_numpy(np.full((1, 3, 32, 32), np.nan, np.float32))
            with pytest.raises(Exception, match="NaN or infinite"):
                client.infer("cifar", [nan])
            assert client.is_server_live()
    lt, at = _torch(ckpt, x)
    np.testing.assert_allclose(res.as_numpy("logits"), lt, atol=1e-4)
    np.testing.assert_array_equal(res.as_numpy("label"), lt.argmax(1))
    np.testing.assert_array_equal(res.as_numpy("modules"), at)


def test_triton_repository_routes_an_image_bundle(bundle, tmp_path, triton_router):
    """Several modular conv layers with pooling between them and a head: every config
    parses and matches its graph, and the routing model's answers (label included) are
    the runtime's, with each module called on exactly the rows that selected it."""
    pytest.importorskip("tritonclient.grpc")
    from collections import Counter

    from modrt.triton import Options, validate, write

    name, manifest, out, _, data = bundle
    repo = tmp_path / "repo"
    write(out, repo, Options())
    assert validate(repo) == len(manifest.graphs) + 1
    router = triton_router(repo, "cifar10")
    rt = modrt.load(out, provider="cpu", strategy="host", threads=1)
    x = cifar10.normalise(data.test_images[:9], cifar10_mean(), ImageModelConfig().std)
    got = router.outputs(router.infer({"image": x[:4]}, {"image": x[4:]})[1])
    ref = rt.run(image=x[4:])
    np.testing.assert_allclose(got["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
    for k in ("label", "modules"):
        np.testing.assert_array_equal(got[k], ref[k])
        assert got[k].dtype == ref[k].dtype
    sel = rt.run(image=x)["modules"]  # (B, L, K)
    for li, layer in enumerate(manifest.layers):
        distinct = Counter(m for row in sel[:, li] for m in set(row.tolist()))
        assert {m: router.calls[g] for m, g in enumerate(layer.module_graphs)} == \
               {m: distinct[m] for m in range(layer.modules)}, name
    assert not any(router.calls[g] for g in manifest.dense.values())


@pytest.fixture(scope="module")
def pixels_bundle(bundle, tmp_path_factory):
    """The same checkpoint exported with ``--image-input pixels``."""
    name, _, out, ckpt, data = bundle
    mp = pytest.MonkeyPatch()
    mp.setattr(cifar10, "load", lambda *a, **k: data)
    try:
        d = tmp_path_factory.mktemp("pixels") / "bundle"
        m = export(ckpt, d, progress=False, parity_images=N_TEST, image_input="pixels")
    finally:
        mp.undo()
    return m, d


def test_pixels_input_normalised_by_the_bundle(bundle, pixels_bundle):
    """Raw uint8 (B, 32, 32, 3) in: the same logits and routing as the float bundle fed the
    normalised picture, the same accuracy from `modrt eval`'s path; out-of-range values are
    refused with a line naming them."""
    _, _, out, _, data = bundle
    m, d = pixels_bundle
    assert m.stages[0] == "pixels" and m.task["image"]["input"] == "pixels"
    assert m.graphs["pixels"].inputs[0].dtype == "uint8" and m.graphs["pixels"].inputs[0].shape == (-1, 32, 32, 3)
    assert m.parity["acc_abs_diff_routed"] == 0 and m.parity["routing_agreement"] == 1.0
    rt, ref = modrt.load(d, provider="cpu", threads=1), modrt.load(out, provider="cpu", threads=1)
    t = rt.signature.input
    assert (t.name, t.dtype, t.shape, t.bounds) == ("pixels", "uint8", (-1, 32, 32, 3), (0, 256))
    p = data.test_images[:7]
    a, b = rt.run(pixels=p), ref.run(image=cifar10.normalise(p, cifar10_mean(), ImageModelConfig().std))
    np.testing.assert_allclose(a["logits"], b["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(a["modules"], b["modules"])
    np.testing.assert_array_equal(rt.run_dense(pixels=p)["modules"], a["modules"])
    assert accuracy(rt, data.test_images, data.test_labels)["acc"] == \
        accuracy(ref, data.test_images, data.test_labels)["acc"]
    with pytest.raises(modrt.InputError, match=r"pixel values must be in \[0, 256\)"):
        rt.run(pixels=p.astype(np.int64) + 200)
    with pytest.raises(modrt.InputError, match="integers"):
        rt.run(pixels=p.astype(np.float32))


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_sends_uint8_pixels(pixels_bundle, bundle, binary):
    tc = pytest.importorskip("tritonclient.http")
    from modrt.serve.batcher import BatchConfig
    from modrt.serve.dataplane import DataPlane
    from tests.serve.conftest import ServerThread

    _, d = pixels_bundle
    p = bundle[4].test_images[:3]
    rt = modrt.load(d, provider="cpu", threads=1)
    with ServerThread(DataPlane(rt, "cifar", BatchConfig(max_batch=8, max_queue_delay_us=2000))) as s:
        with tc.InferenceServerClient(s.url.removeprefix("http://")) as client:
            meta = client.get_model_metadata("cifar")
            assert meta["inputs"][0] == {"name": "pixels", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}
            inp = tc.InferInput("pixels", list(p.shape), "UINT8")
            inp.set_data_from_numpy(p, binary_data=binary)
            res = client.infer("cifar", [inp])
    ref = rt.run(pixels=p)
    np.testing.assert_array_equal(res.as_numpy("label"), ref["label"])
    np.testing.assert_allclose(res.as_numpy("logits"), ref["logits"], atol=1e-6)


def test_triton_repository_of_a_pixels_bundle(pixels_bundle, bundle, tmp_path, triton_router):
    pytest.importorskip("tritonclient.grpc")
    from modrt.triton import Options, validate, write
    from modrt.triton.repository import parse

    m, d = pixels_bundle
    repo = tmp_path / "repo"
    write(d, repo, Options())
    assert validate(repo) == len(m.graphs) + 1
    cfg = parse(repo / "models" / "cifar10" / "config.pbtxt")
    assert cfg.input[0].name == "pixels" and list(cfg.input[0].dims) == [32, 32, 3]
    p = bundle[4].test_images[:5]
    router = triton_router(repo, "cifar10")
    got = router.outputs(router.infer({"pixels": p})[0])
    ref = modrt.load(d, provider="cpu", strategy="host", threads=1).run(pixels=p)
    np.testing.assert_allclose(got["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["modules"], ref["modules"])
