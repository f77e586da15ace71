"""CUDA and TensorRT provider sessions on a synthetic bundle; skipped where unavailable."""

from __future__ import annotations

import numpy as np
import pytest

import modrt
from modrt.runtime import ProviderConfig
from modrt.runtime import providers as prov


def need(name: str) -> None:
    have = prov.available()
    if prov.PROVIDERS[name] not in have:
        pytest.skip(f"{prov.PROVIDERS[name]} not available here (onnxruntime offers {', '.join(have)}; "
                    "install modrt[gpu] on a GPU host)")


@pytest.mark.parametrize("k", [1, 3])
def test_cuda_routed_equals_dense_and_cpu(ff_bundle, k):
    need("cuda")
    d = ff_bundle(modules=6, k=k, dims=(16, 32, 16))
    gpu, cpu = modrt.load(d, provider="cuda"), modrt.load(d, provider="cpu")
    assert gpu.provider == "CUDAExecutionProvider"
    x = np.random.default_rng(0).standard_normal((20, 16)).astype(np.float32)
    r = gpu.run(x=x)
    np.testing.assert_array_equal(r["modules"], gpu.run_dense(x=x)["modules"])
    np.testing.assert_allclose(r["y"], gpu.run_dense(x=x)["y"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(r["y"], cpu.run(x=x)["y"], rtol=1e-4, atol=1e-4)


def test_tensorrt_builds_cached_engines(ff_bundle, tmp_path):
    need("tensorrt")
    d = ff_bundle(modules=4, k=1, dims=(16, 32, 16))
    cfg = ProviderConfig(name="tensorrt", cache_dir=str(tmp_path / "trt"), max_batch=64)
    model = modrt.load(d, provider_config=cfg)
    assert model.provider == "TensorrtExecutionProvider"
    x = np.random.default_rng(0).standard_normal((20, 16)).astype(np.float32)
    for batch in (1, 7, 20):  # within the profile: no engine rebuild
        r = model.run(x=x[:batch])
        np.testing.assert_allclose(r["y"], model.run_dense(x=x[:batch])["y"], rtol=1e-3, atol=1e-3)
    assert any((tmp_path / "trt").iterdir()), "no engine written to the cache directory"


def test_auto_picks_a_gpu_when_present(ff_bundle):
    have = prov.available()
    if not {prov.PROVIDERS["cuda"], prov.PROVIDERS["tensorrt"]} & set(have):
        pytest.skip(f"no GPU provider here (onnxruntime offers {', '.join(have)})")
    assert modrt.load(ff_bundle(), provider="auto").provider != "CPUExecutionProvider"
