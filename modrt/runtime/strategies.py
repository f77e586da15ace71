"""The strategy registry: what a modular layer can run as, building one, and ``ByBatch``
(the layer ``Model`` runs: one built layer per chosen strategy, picked per batch size).

``auto.py`` measures and chooses; ``choices.py`` caches the choice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from modrt._exceptions import InputError, ModrtError
from modrt.bundle import LayerSpec, Manifest
from modrt.runtime import fused, graph, host, loop
from modrt.runtime import providers as prov
from modrt.runtime.sessions import SessionConfig, Sessions

log = logging.getLogger("modrt.runtime")

STRATEGIES = ("auto", "host", "graph", "fused")
# What a layer can run as: the explicit strategies, and graph's Loop-over-time variant for
# a recurrent bundle's one layer (auto's choice only; see loop.py).
BUILDABLE = ("host", "graph", "fused", "graph-loop")
THREADED = ("graph", "fused")  # composed strategies auto also measures at another thread count


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


__all__ = ["BUILDABLE", "ByBatch", "STRATEGIES", "THREADED", "build", "buildable", "fixed", "split",
           "thread_variant"]
