"""Provider choice, the errors for unknown/unavailable ones, and the TensorRT options."""

from __future__ import annotations

import pytest

import modrt
from modrt._exceptions import ProviderError
from modrt.bundle import GraphSpec, TensorSpec
from modrt.runtime import providers as prov

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"


@pytest.mark.parametrize("have,want", [
    ([TRT, CUDA, CPU], TRT), ([CUDA, CPU], CUDA), (["AzureExecutionProvider", CPU], CPU),
])
def test_auto_prefers_tensorrt_then_cuda_then_cpu(have, want):
    assert prov.resolve("auto", have) == want


@pytest.mark.parametrize("name,want", [("cpu", CPU), ("CUDA", CUDA), ("tensorrt", TRT), (CUDA, CUDA)])
def test_explicit_names(name, want):
    assert prov.resolve(name, [TRT, CUDA, CPU]) == want


def test_unknown_provider_lists_the_available_ones():
    with pytest.raises(ProviderError) as info:
        prov.resolve("rocm", [CPU])
    msg = str(info.value)
    assert "provider 'rocm' unknown" in msg and "auto, tensorrt, cuda, cpu" in msg
    assert f"available here: {CPU}" in msg and "\n" not in msg


def test_unavailable_provider_is_one_line():
    with pytest.raises(ProviderError) as info:
        prov.resolve("cuda", ["AzureExecutionProvider", CPU])
    msg = str(info.value)
    assert msg.startswith(f"provider 'cuda' ({CUDA}) is not available; available: ") and "\n" not in msg


def test_load_refuses_unknown_and_unavailable_providers(ff_bundle):
    with pytest.raises(ProviderError, match="provider 'bogus' unknown"):
        modrt.load(ff_bundle(), provider="bogus")
    missing = [p for p in ("tensorrt", "cuda") if prov.PROVIDERS[p] not in prov.available()]
    if not missing:
        pytest.skip("both GPU providers are available here")
    with pytest.raises(ProviderError, match="is not available"):
        modrt.load(ff_bundle(), provider=missing[0])


def spec() -> GraphSpec:
    return GraphSpec(file="embedding.onnx", sha256="0" * 64,
                     inputs=(TensorSpec("tokens", "int64", (-1, -1)), TensorSpec("h", "float32", (-1, 16))),
                     outputs=(TensorSpec("emb", "float32", (-1, -1, 8)),))


def test_profile_shapes_cover_batch_and_time():
    cfg = prov.ProviderConfig(min_batch=1, opt_batch=8, max_batch=64, opt_seq=35, max_seq=128)
    assert prov.profile_shapes(spec(), cfg) == {
        "trt_profile_min_shapes": "tokens:1x1,h:1x16",
        "trt_profile_opt_shapes": "tokens:8x35,h:8x16",
        "trt_profile_max_shapes": "tokens:64x128,h:64x16",
    }


def test_tensorrt_and_cuda_options_are_complete(tmp_path):
    cfg = prov.ProviderConfig(fp16=True, device_id=1, gpu_mem_limit=1 << 30)
    plist = prov.providers_for(TRT, spec(), cfg, tmp_path / "engines")
    assert [p for p, _ in plist] == [TRT, CUDA, CPU]  # CPU last: the fallback
    trt, cuda = plist[0][1], plist[1][1]
    for key in ("trt_engine_cache_enable", "trt_engine_cache_path", "trt_timing_cache_enable",
                "trt_timing_cache_path", "trt_fp16_enable", "trt_max_workspace_size",
                "trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"):
        assert key in trt
    assert trt["trt_fp16_enable"] == "1" and trt["trt_engine_cache_path"] == str(tmp_path / "engines")
    assert (tmp_path / "engines").is_dir()
    assert cuda["device_id"] == "1" and cuda["gpu_mem_limit"] == str(1 << 30)
    assert cuda["cudnn_conv_algo_search"] == "HEURISTIC"
    assert prov.providers_for(CUDA, spec(), cfg, None) == [(CUDA, cuda), (CPU, {})]
    assert prov.providers_for(CPU, spec(), cfg, None) == [(CPU, {})]


def test_cache_dir_is_keyed_by_bundle_contents(ff_bundle, tmp_path, monkeypatch):
    from modrt import bundle

    monkeypatch.delenv("MODRT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    a, b = ff_bundle(k=1), ff_bundle(k=2)
    da = prov.default_cache_dir(a, bundle.load(a))
    db = prov.default_cache_dir(b, bundle.load(b))
    assert da != db and da.parent == tmp_path / "modrt" / "tensorrt"
    assert da == prov.default_cache_dir(a, bundle.load(a))


@pytest.mark.parametrize("bad", [dict(min_batch=0), dict(opt_batch=1000), dict(opt_seq=0),
                                 dict(cudnn_conv_algo_search="FAST")])
def test_provider_config_validation(bad):
    with pytest.raises(ValueError):
        prov.ProviderConfig(**bad)


def test_one_cache_dir_for_engines_choices_and_data(ff_bundle, tmp_path, monkeypatch):
    """$MODRT_CACHE moves every cache modrt keeps: TensorRT engines, auto's choices, PTB."""
    from modrt import bundle
    from modrt.data import ptb
    from modrt.runtime import auto

    monkeypatch.setenv("MODRT_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    a = ff_bundle(k=1)
    assert prov.default_cache_dir(a, bundle.load(a)).parent == tmp_path / "c" / "tensorrt"
    assert auto.cache_dir() == tmp_path / "c"
    assert ptb.cache_dir() == tmp_path / "c" / "ptb"
