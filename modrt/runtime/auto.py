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

``ByBatch`` is the layer ``Model`` runs: it holds one built layer per chosen strategy and
``pick(batch)`` returns the one for a batch size (once per ``run``, not per time step).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from modrt._cache import CACHE_ENV, cache_dir
from modrt._exceptions import InputError, ModrtError
from modrt._version import __version__
from modrt.bundle import LayerSpec, Manifest
from modrt.runtime import fused, graph, host, loop, timing
from modrt.runtime import providers as prov
from modrt.runtime.sessions import SessionConfig, Sessions, cores

log = logging.getLogger("modrt.runtime")

STRATEGIES = ("auto", "host", "graph", "fused")
# What a layer can run as: the explicit strategies, and graph's Loop-over-time variant for
# a recurrent bundle's one layer (auto's choice only; see loop.py).
BUILDABLE = ("host", "graph", "fused", "graph-loop")
THREADED = ("graph", "fused")  # composed strategies auto also measures at another thread count
CANDIDATES = 2  # in the cache key: what auto measures (2: THREADED at both thread counts)
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


# --- one layer per strategy -------------------------------------------------------------


def split(name: str) -> tuple[str, int | None]:
    """``"fused@2"`` -> ("fused", 2): a composed strategy's session on 2 intra-op threads;
    ``"fused"`` -> ("fused", None): the threads ``SessionConfig.threads_for`` gives it."""
    base, at, n = name.partition("@")
    if not at:
        return base, None
    if base not in THREADED or not n.isdigit() or int(n) < 1:
        raise InputError(f"strategy {name!r} unknown; choose one of {', '.join(STRATEGIES)}")
    return base, int(n)


def buildable(name: str) -> bool:
    try:
        return split(name)[0] in BUILDABLE
    except InputError:
        return False


def thread_variant(name: str, layer: Any, config: SessionConfig) -> str | None:
    """The other thread count worth measuring for a composed layer, as a strategy name.

    A composed session gets one intra-op thread when its largest weight is small
    (``SessionConfig.small_graph_bytes``), all cores otherwise. Which is faster depends on
    the batch, not the weights alone. Measured on 2 cores, 15 256-wide modules, K=1: ORT's
    MoE runs its experts in parallel (fused, batch 8: 149 µs on 2 threads, 165 on 1; batch
    64: 416 vs 541), while the graph strategy's many small kernels lose more to waking the
    second thread than they gain (batch 64: 500 vs 398 µs); at batch 1 neither gains. So
    auto measures both and keeps the faster per batch range."""
    if config.thread_pool != "session" or config.intra_threads < 2 or name not in THREADED:
        return None
    try:
        used = layer.session.get_session_options().intra_op_num_threads
    except AttributeError:
        return None
    other = 1 if used != 1 else config.intra_threads
    return f"{name}@{other}" if other != used else None


def build(name: str, directory: str | os.PathLike, manifest: Manifest, spec: LayerSpec,
          sessions: Sessions, config: SessionConfig):
    """The layer ``spec`` under strategy ``name`` (host | graph | fused | graph-loop, the
    composed ones optionally ``@threads``); InputError if it declines the layer. Anything
    else it raises is a failure, not a decline: ``choose`` reports it (``_try_build``)."""
    if name == "host":
        return host.HostLayer(spec, sessions)
    base, n = split(name)
    if n is not None:  # every graph of the layer's session on n threads, whatever its weights
        return build(base, directory, manifest, spec, sessions, replace(config, threads=n, small_graph_bytes=0))
    kinds = {"graph": graph.GraphLayer, "fused": fused.FusedLayer, "graph-loop": loop.LoopLayer}
    if name not in kinds:
        raise InputError(f"strategy {name!r} unknown; choose one of {', '.join(STRATEGIES)}")
    plist: list = sessions[spec.controller].providers  # what the bundle's sessions run on
    if plist[0] == prov.PROVIDERS["cuda"]:  # the same device and options as theirs
        plist = prov.providers_for(plist[0], manifest.graphs[spec.controller], sessions.provider_config, None)
    return kinds[name](directory, manifest, spec, config, plist)


def _try_build(name: str, directory: str | os.PathLike, manifest: Manifest, spec: LayerSpec,
               sessions: Sessions, config: SessionConfig, declined: dict[str, str]) -> Any | None:
    """``build`` for auto's candidates: a strategy that declines the layer (InputError) is
    left out quietly; one that fails any other way (a composition tool, onnxruntime loading
    the composed graph, a bug) is left out with its reason logged at warning level. Either
    way the reason goes into ``declined`` (and the choice cache)."""
    try:
        return build(name, directory, manifest, spec, sessions, config)
    except InputError as exc:
        declined[name] = str(exc)
    except Exception as exc:  # noqa: BLE001 - reported, never silent; the others still run the layer
        declined[name] = why = f"failed to build: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        log.warning("auto: %s: strategy %s dropped: %s", spec.name, name, why)
    return None


def _build_chosen(name: str, directory: str | os.PathLike, manifest: Manifest, spec: LayerSpec,
                  sessions: Sessions, config: SessionConfig) -> Any:
    """``build`` for a strategy the user named: a failure that is not modrt's own error
    becomes one line naming the strategy, the layer and the cause (chained)."""
    try:
        return build(name, directory, manifest, spec, sessions, config)
    except ModrtError:
        raise
    except Exception as exc:
        raise ModrtError(f"strategy {name!r} failed to build layer {spec.name} "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from exc


class ByBatch:
    """A modular layer run by the strategy chosen for the batch size (``auto``)."""

    kind = "auto"

    CACHED_BATCHES = 4096  # pick() remembers the layer of batch sizes up to this

    def __init__(self, spec: LayerSpec, ranges: list[tuple[int | None, str]], layers: dict[str, Any]):
        self.spec = spec
        self.ranges = ranges  # [(largest batch or None for any, strategy[@threads])], ascending
        self.layers = layers  # strategy -> built layer
        self.inputs = next(iter(layers.values())).inputs
        # The one per-batch cache: batch -> (layer, runner), one dict lookup on the hot path.
        self.cache: dict[int, tuple[Any, Callable]] = {}

    def variant_for(self, batch: int) -> str:
        """The layer run at this batch size: a strategy, ``@threads`` where auto chose those."""
        for upto, name in self.ranges:
            if upto is None or batch <= upto:
                return name
        raise AssertionError(self.ranges)  # the last range is open

    def strategy_for(self, batch: int) -> str:
        return split(self.variant_for(batch))[0]

    def entry(self, batch: int) -> tuple[Any, Callable]:
        """(layer, runner) for this batch size, remembered in ``cache`` (up to
        ``CACHED_BATCHES``). The runner is ``f(feeds, None) -> (out, a)``, the cheapest
        call there is: a composed layer's ``raw`` session run (its caller converts its
        errors: ``errors.convert``), else the layer itself."""
        e = self.cache.get(batch)
        if e is None:
            layer = self.layers[self.variant_for(batch)]
            e = (layer, getattr(layer, "raw", layer))
            if batch <= self.CACHED_BATCHES:
                self.cache[batch] = e
        return e

    def pick(self, batch: int):
        e = self.cache.get(batch)
        return (e or self.entry(batch))[0]

    def runner(self, batch: int) -> Callable:
        e = self.cache.get(batch)
        return (e or self.entry(batch))[1]

    def __call__(self, feeds: dict[str, np.ndarray], out: np.ndarray | None = None):
        return self.pick(next(iter(feeds.values())).shape[0])(feeds, out)

    def describe(self) -> str:
        lo, parts = 1, []
        for upto, name in self.ranges:
            parts.append(f"{name} for batch {lo}+" if upto is None else
                         f"{name} for batch {lo}" + (f"-{upto}" if upto > lo else ""))
            lo = (upto or 0) + 1
        return ", ".join(parts)


def fixed(name: str, spec: LayerSpec, layer: Any) -> ByBatch:
    return ByBatch(spec, [(None, name)], {name: layer})


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


# --- the cache --------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return {"system": platform.system(), "arch": platform.machine(), "cpu": cpu, "cores": cores()}


def cache_key(directory: str | os.PathLike, provider: str, config: SessionConfig, auto: AutoConfig) -> tuple[str, dict]:
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
