"""The cache of ``auto``'s choice: JSON under ``cache_dir("strategy")``, keyed by the bundle
(sha256 of manifest.json, which holds every graph's sha256), the machine, the provider,
onnxruntime's and modrt's versions, and the session and measuring settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

from modrt._version import __version__
from modrt.bundle import LayerSpec
from modrt.runtime.sessions import SessionConfig, cores
from modrt.runtime.strategies import buildable

log = logging.getLogger("modrt.runtime")

CANDIDATES = 2  # in the cache key: what auto measures (2: THREADED at both thread counts)


def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return {"system": platform.system(), "arch": platform.machine(), "cpu": cpu, "cores": cores()}


def cache_key(directory: str | os.PathLike, provider: str, config: SessionConfig, auto: Any) -> tuple[str, dict]:
    import onnxruntime as ort

    what = {
        "manifest_sha256": hashlib.sha256((Path(directory) / "manifest.json").read_bytes()).hexdigest(),
        "machine": _machine(), "provider": provider, "onnxruntime": ort.__version__, "modrt": __version__,
        "candidates": CANDIDATES,
        "session": asdict(config), "batches": list(auto.batches), "large_layer_bytes": auto.large_layer_bytes,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24], what


def _read_cache(path: Path, layers: tuple[LayerSpec, ...]) -> dict[str, list[tuple[int | None, str]]] | None:
    try:
        raw = json.loads(path.read_text())
        got = {name: [(r["max_batch"], r["strategy"]) for r in ranges] for name, ranges in raw["layers"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ok = set(got) == {l.name for l in layers} and all(
        rs and rs[-1][0] is None and all(buildable(s) for _, s in rs) for rs in got.values())
    return got if ok else None


def _write_cache(path: Path, record: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home must not stop a load
        log.warning("auto: cannot write the strategy cache %s (%s)", path, exc)


__all__ = ["CANDIDATES", "cache_key"]
