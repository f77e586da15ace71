"""Strategy choice per modular layer (DESIGN.md §6 "Strategies"): ``host``, ``graph``,
``fused`` or ``auto``, which measures the ones that apply on the bundle's own shapes at
load and keeps the fastest per batch range.

    auto, per layer:
      candidates  host always; graph and fused where they apply and build (a strategy that
                  declines says why, logged at debug); each of graph and fused also with
                  the other intra-op thread count (``fused@2``: its session on 2 threads;
                  ``thread_variant``) when there are several cores and per-session pools.
                  Large layers skip the measurement:
                  above ``AutoConfig.large_layer_bytes`` of module graphs a module call costs
                  hundreds of µs, the host strategy's per-call overhead (~10 µs) is a few
                  percent of it, and composing the modules would take seconds at load.
      measure     for each batch in ``AutoConfig.batches``: random inputs of the layer's
                  shapes, the candidates run in turns of short blocks (interleaved, so
                  background load hits all alike; blocks, so each runs warm as it will
                  when serving) until the time share or ``max_calls`` is spent; median.
      choose      the fastest per batch; batch b_i covers the sizes up to the geometric
                  mean of b_i and b_{i+1}.
      cache       the choice as JSON under ``cache_dir()/strategy``, keyed by the bundle
                  (sha256 of manifest.json, which holds every graph's sha256), the machine,
                  the provider, onnxruntime's and modrt's versions and the session
                  settings. A changed bundle has another key, so it is measured afresh.

Split by concern: ``strategies.py`` (the registry: building a layer under a strategy, and
``ByBatch``, the layer ``Model`` runs, one built layer per chosen strategy picked per batch
size), this file (measuring and choosing), ``choices.py`` (the choice cache).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modrt._cache import CACHE_ENV, cache_dir
from modrt._exceptions import InputError
from modrt.bundle import LayerSpec, Manifest
from modrt.runtime import host, timing
from modrt.runtime.choices import _read_cache, _write_cache, cache_key
from modrt.runtime.sessions import SessionConfig, Sessions
from modrt.runtime.strategies import (  # noqa: F401 - auto's names for the registry's, as before the split
    BUILDABLE,
    STRATEGIES,
    THREADED,
    ByBatch,
    _build_chosen,
    _try_build,
    build,
    buildable,
    fixed,
    split,
    thread_variant,
)

log = logging.getLogger("modrt.runtime")

WINDOW = 8  # time steps per measured call when auto compares whole windows (recurrent)


@dataclass(frozen=True)
class AutoConfig:
    """How ``auto`` measures; the defaults keep a load under ~2 s of measuring."""

    seconds: float = 1.5  # measuring budget for the whole bundle
    batches: tuple[int, ...] = (1, 8, 64)  # representative batch sizes, ascending
    max_calls: int = 200  # per candidate and batch, within the time share: a stable median
    # Layers whose module graphs total more bytes keep host without measuring: composing
    # them takes seconds (16 modules of 1024x1024: graph 0.9 s, fused 2.0 s to build).
    large_layer_bytes: int = 64 << 20
    cache: bool = True  # read and write the choice cache

    def __post_init__(self) -> None:
        if self.seconds <= 0 or self.max_calls < 1:
            raise ValueError(f"need seconds > 0 and max_calls >= 1, got {self.seconds}, {self.max_calls}")
        if not self.batches or list(self.batches) != sorted(set(self.batches)) or self.batches[0] < 1:
            raise ValueError(f"batches must be distinct positive sizes in ascending order, got {self.batches}")


# --- measuring --------------------------------------------------------------------------


def _feeds(manifest: Manifest, spec: LayerSpec, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for t in manifest.graphs[spec.controller].inputs:
        shape = (batch, *[d if d > 0 else 1 for d in t.shape[1:]])
        a = rng.standard_normal(shape).astype(t.dtype) if t.dtype.startswith("float") else np.zeros(shape, t.dtype)
        if t.name == spec.state:
            a = np.tanh(a)  # a recurrent state lives in (-1, 1)
        feeds[t.name] = a
    return feeds


def _window(manifest: Manifest, spec: LayerSpec, batch: int, rng: np.random.Generator) -> dict[str, Any]:
    """A recurrent layer's input over ``WINDOW`` steps, (T, B, E), and a state (B, H)."""
    steps = [_feeds(manifest, spec, batch, rng) for _ in range(WINDOW)]
    x = next(n for n in steps[0] if n != spec.state)
    x_tm = np.stack([f[x] for f in steps])  # (T, B, E)
    h0 = steps[0][spec.state]
    return {"x": x, "x_tm": x_tm, "h0": h0, "hs": np.empty((WINDOW, *h0.shape), h0.dtype)}


def measure(fns: dict[str, Callable[[dict], object]], pool: list[dict], seconds: float, max_calls: int,
            rounds: int = 4) -> dict[str, float]:
    """Median µs per call of each candidate over ``pool``, within about ``seconds``: the
    interleaved loop (``timing.interleaved``) with ``rounds`` turns of a block each, every
    candidate cycling over the pool from its start, at least one call each."""
    def cycling(f: Callable[[dict], object]) -> Callable[[], object]:
        it = itertools.cycle(pool)
        return lambda: f(next(it))

    share = seconds / max(1, len(fns))
    ns = timing.interleaved({k: cycling(f) for k, f in fns.items()}, int(share * 1e9), int(share / rounds * 1e9),
                            min_calls=1, max_calls=max_calls, warmup=1)
    return {k: float(np.median(v)) / 1e3 for k, v in ns.items()}


def _ranges(batches: tuple[int, ...], winners: list[str]) -> list[tuple[int | None, str]]:
    out: list[tuple[int | None, str]] = []
    for i, w in enumerate(winners):
        upto = None if i == len(batches) - 1 else int(np.sqrt(batches[i] * batches[i + 1]))
        if out and out[-1][1] == w:
            out[-1] = (upto, w)
        else:
            out.append((upto, w))
    return out


# --- the choice -------------------------------------------------------------------------


def choose(directory: str | os.PathLike, manifest: Manifest, sessions: Sessions, config: SessionConfig,
           strategy: str = "auto", auto: AutoConfig | None = None) -> dict[str, ByBatch]:
    """Layer name -> ``ByBatch`` for ``strategy`` (explicit strategies: one range)."""
    if strategy not in STRATEGIES:
        raise InputError(f"strategy {strategy!r} unknown; choose one of {', '.join(STRATEGIES)}")
    if strategy != "auto":
        return {l.name: fixed(strategy, l, _build_chosen(strategy, directory, manifest, l, sessions, config))
                for l in manifest.layers}
    auto = auto or AutoConfig()
    key, what = cache_key(directory, sessions.used, config, auto)
    path = cache_dir("strategy", f"{key}.json")
    cached = _read_cache(path, manifest.layers) if auto.cache else None
    if cached is not None:
        try:
            out = {l.name: ByBatch(l, cached[l.name], {s: build(s, directory, manifest, l, sessions, config)
                                                      for _, s in cached[l.name]}) for l in manifest.layers}
        except InputError as exc:  # the machine changed under the same key: measure again
            log.info("auto: cached choice does not build (%s); measuring", exc)
        except Exception as exc:  # noqa: BLE001 - reported; measuring reports each strategy again
            log.warning("auto: cached choice failed to build (%s: %s); measuring", type(exc).__name__, exc)
        else:
            for name, layer in out.items():
                log.info("auto: %s: %s (cached, %s)", name, layer.describe(), path)
            return out
    t0 = time.perf_counter()
    out, measured = {}, {}
    budget = auto.seconds / max(1, len(manifest.layers))
    rng = np.random.default_rng(0)
    for spec in manifest.layers:
        layers = {"host": host.HostLayer(spec, sessions)}
        declined = {}
        size = sum((Path(directory) / manifest.graphs[g].file).stat().st_size for g in spec.module_graphs)
        if size > auto.large_layer_bytes:
            declined["graph"] = declined["fused"] = f"large modules ({size >> 20} MiB): host's overhead is small"
        else:
            windows = manifest.topology == "recurrent" and len(manifest.layers) == 1 and spec.state is not None
            for name in ("graph", "fused") + (("graph-loop",) if windows else ()):
                if name == "graph-loop" and "graph" not in layers:
                    continue
                built = _try_build(name, directory, manifest, spec, sessions, config, declined)
                if built is None:
                    continue
                layers[name] = built
                other = thread_variant(name, built, config)
                if other is not None:
                    built = _try_build(other, directory, manifest, spec, sessions, config, declined)
                    if built is not None:
                        layers[other] = built
        for name, why in declined.items():
            log.debug("auto: %s: %s declined: %s", spec.name, name, why)
        if len(layers) == 1:
            out[spec.name] = fixed("host", spec, layers["host"])
            measured[spec.name] = {"declined": declined}
            continue
        winners, us = [], {}
        for B in auto.batches:
            if "graph-loop" in layers:  # compare whole windows: the Loop saves per-step calls
                pool = [_window(manifest, spec, B, rng) for _ in range(4)]
                fns = {k: (lambda layer: lambda w: layer.window(w["x_tm"], w["h0"], w["hs"]))(v)
                       for k, v in layers.items()}
            else:
                pool = [_feeds(manifest, spec, B, rng) for _ in range(8)]
                fns = {k: (lambda layer: lambda f: layer(f))(v) for k, v in layers.items()}
            us[str(B)] = {k: round(v, 1) for k, v in measure(
                fns, pool, budget / len(auto.batches), auto.max_calls).items()}
            winners.append(min(us[str(B)], key=us[str(B)].get))
        ranges = _ranges(auto.batches, winners)
        out[spec.name] = ByBatch(spec, ranges, {s: layers[s] for _, s in ranges})
        measured[spec.name] = {"us_per_call": us, "declined": declined}
    elapsed = time.perf_counter() - t0
    for name, layer in out.items():
        log.info("auto: %s: %s (measured in %.2f s)", name, layer.describe(), elapsed)
    if auto.cache:
        _write_cache(path, {
            "key": key, "bundle": Path(directory).resolve().name, **what, "seconds": round(elapsed, 3),
            "layers": {n: [{"max_batch": u, "strategy": s} for u, s in l.ranges] for n, l in out.items()},
            "measured": measured,
        })
    return out


__all__ = ["AutoConfig", "BUILDABLE", "ByBatch", "STRATEGIES", "CACHE_ENV", "build", "cache_dir", "cache_key",
           "choose", "measure"]
