"""Execution providers: ``--provider auto|tensorrt|cuda|cpu`` -> ONNX Runtime's list.

``auto`` takes TensorRT, then CUDA, then CPU, the first that this onnxruntime build
offers (``onnxruntime.get_available_providers()``). Every GPU choice keeps the CPU
provider last in the list, so a node the GPU provider cannot take still runs.

TensorRT needs (DESIGN.md §6) an engine cache, a timing cache, fp16 as an option and
explicit optimisation profiles, one per graph, built from the manifest's input specs:
the batch dimension (-1) ranges over min/opt/max batch, any other dynamic dimension (the
time axis of the embedding and head graphs) over 1/opt/max sequence length. With
explicit profiles and the engine cache, an engine is built once per graph and reused for
every batch in range (ORT compares the profile with the cached ``.profile`` file).
Option names: onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modrt._cache import cache_dir
from modrt._exceptions import ProviderError
from modrt.bundle import GraphSpec, Manifest

# short name -> ONNX Runtime provider name; unknown keys raise KeyError.
PROVIDERS: dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
AUTO_ORDER = ("tensorrt", "cuda", "cpu")
CHOICES = ("auto", *AUTO_ORDER)


@dataclass(frozen=True)
class ProviderConfig:
    """How to set up the execution provider; one per loaded bundle."""

    name: str = "auto"  # auto | tensorrt | cuda | cpu (or a full ORT provider name)
    device_id: int = 0  # GPU ordinal for CUDA and TensorRT
    cache_dir: str | None = None  # TensorRT engine cache; None: per-bundle user cache dir
    fp16: bool = False  # TensorRT builds fp16 engines (outputs then differ from fp32)
    min_batch: int = 1  # TensorRT optimisation profile over the batch (and routed rows)
    opt_batch: int = 8
    max_batch: int = 256
    opt_seq: int = 35  # profile over the time axis of embedding/head graphs
    max_seq: int = 512
    workspace_bytes: int = 4 << 30  # trt_max_workspace_size
    gpu_mem_limit: int = 0  # CUDA arena limit in bytes, 0: no limit
    cudnn_conv_algo_search: str = "HEURISTIC"  # EXHAUSTIVE | HEURISTIC | DEFAULT

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(
                f"need 1 <= min_batch <= opt_batch <= max_batch, got "
                f"{self.min_batch}, {self.opt_batch}, {self.max_batch}")
        if not 1 <= self.opt_seq <= self.max_seq:
            raise ValueError(f"need 1 <= opt_seq <= max_seq, got {self.opt_seq}, {self.max_seq}")
        if self.cudnn_conv_algo_search not in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
            raise ValueError(
                f"cudnn_conv_algo_search {self.cudnn_conv_algo_search!r} unknown; "
                "allowed EXHAUSTIVE, HEURISTIC, DEFAULT")


def available() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def resolve(name: str, have: list[str] | None = None) -> str:
    """The ONNX Runtime provider name for ``name``; ``ProviderError`` if unknown or absent."""
    have = available() if have is None else have
    key = name.lower()
    if key == "auto":
        for short in AUTO_ORDER:
            if PROVIDERS[short] in have:
                return PROVIDERS[short]
        raise ProviderError(f"no usable execution provider; onnxruntime offers {', '.join(have)}")
    full = {v.lower(): v for v in PROVIDERS.values()}
    if key in PROVIDERS:
        ort_name = PROVIDERS[key]
    elif key in full:
        ort_name = full[key]
    else:
        raise ProviderError(
            f"provider {name!r} unknown; choose one of {', '.join(CHOICES)} "
            f"(available here: {', '.join(have)})")
    if ort_name not in have:
        hint = " (install onnxruntime-gpu: pip install 'modrt[gpu]')" if key != "cpu" else ""
        raise ProviderError(
            f"provider {name!r} ({ort_name}) is not available; available: {', '.join(have)}{hint}")
    return ort_name


def default_cache_dir(bundle_dir: str | os.PathLike, manifest: Manifest) -> Path:
    """A user cache directory keyed by the bundle's contents (the graphs' sha256s), so the
    bundle directory itself stays read-only and a re-exported bundle gets new engines."""
    key = hashlib.sha256("".join(sorted(g.sha256 for g in manifest.graphs.values())).encode())
    return cache_dir("tensorrt", f"{Path(bundle_dir).resolve().name}-{key.hexdigest()[:16]}")


def profile_shapes(spec: GraphSpec, cfg: ProviderConfig) -> dict[str, str]:
    """trt_profile_{min,opt,max}_shapes for one graph: ``"x:1x1024,h:1x256"``."""
    picks = {"min": (cfg.min_batch, 1), "opt": (cfg.opt_batch, cfg.opt_seq),
             "max": (cfg.max_batch, cfg.max_seq)}
    out = {}
    for kind, (batch, seq) in picks.items():
        parts = []
        for t in spec.inputs:
            dims = [d if d != -1 else (batch if i == 0 else seq) for i, d in enumerate(t.shape)]
            parts.append(f"{t.name}:{'x'.join(str(d) for d in dims)}")
        out[f"trt_profile_{kind}_shapes"] = ",".join(parts)
    return out


def tensorrt_options(spec: GraphSpec, cfg: ProviderConfig, cache_dir: Path) -> dict[str, Any]:
    return {
        "device_id": cfg.device_id,
        "trt_max_workspace_size": cfg.workspace_bytes,
        "trt_fp16_enable": cfg.fp16,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        # The timing cache depends on the GPU and TensorRT version only: share it.
        "trt_timing_cache_path": str(cache_dir.parent),
        **profile_shapes(spec, cfg),
    }


def cuda_options(cfg: ProviderConfig) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "device_id": cfg.device_id,
        "arena_extend_strategy": "kSameAsRequested",  # no power-of-two blow-up per module
        "cudnn_conv_algo_search": cfg.cudnn_conv_algo_search,
        "do_copy_in_default_stream": True,
        "cudnn_conv_use_max_workspace": True,
    }
    if cfg.gpu_mem_limit:
        opts["gpu_mem_limit"] = cfg.gpu_mem_limit
    return opts


def providers_for(
    ort_name: str, spec: GraphSpec, cfg: ProviderConfig, cache_dir: Path | None
) -> list[tuple[str, dict[str, Any]]]:
    """The ``providers=`` list for one graph's InferenceSession, CPU always last."""
    cpu = ("CPUExecutionProvider", {})
    if ort_name == PROVIDERS["tensorrt"]:
        assert cache_dir is not None
        cache_dir.mkdir(parents=True, exist_ok=True)
        return [(ort_name, _strings(tensorrt_options(spec, cfg, cache_dir))),
                (PROVIDERS["cuda"], _strings(cuda_options(cfg))), cpu]
    if ort_name == PROVIDERS["cuda"]:
        return [(ort_name, _strings(cuda_options(cfg))), cpu]
    return [cpu]


def _strings(opts: dict[str, Any]) -> dict[str, str]:
    """ORT parses provider options from strings; booleans as "1"/"0" suit every parser."""
    return {k: ("1" if v else "0") if isinstance(v, bool) else str(v) for k, v in opts.items()}


__all__ = [
    "CHOICES", "PROVIDERS", "ProviderConfig", "available", "resolve", "default_cache_dir",
    "profile_shapes", "providers_for",
]
