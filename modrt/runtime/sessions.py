"""One ONNX Runtime session per graph, created once per bundle (DESIGN.md §6).

Threads. ORT's intra-op workers spin after every run by default; 17 sessions on 2
cores then starve each other (measured here, M=15 K=3 256-wide modules, batch 64:
routed 29.6 ms with spinning, 1.1 ms without). So every session gets
``session.intra_op.allow_spinning = 0`` (and inter-op likewise) and one inter-op thread
(the graphs are chains; sequential execution). Intra-op threads are sized per graph:
without spinning, every run wakes the pool's sleeping workers, which costs more than a
small graph's work. Measured on 2 cores, one module call, rows cycling over modules
(1 thread / 2 threads): 256x256 MLP 25/43 µs at 1 row, 105/152 µs at 64 rows;
1024x1024 (8 MB) 389/321 µs and 1987/1210 µs; 1024x4096 (32 MB) 2.31/1.25 ms. So
graphs whose largest weight is under ``small_graph_bytes`` (4 MiB) get one thread,
others ``threads`` (default: the cores this process may use). ``auto`` measures the
composed ``graph``/``fused`` layers on the other count too (``fused@2``): ORT's MoE kernel
splits the experts between threads, and at batch 8-64 that pays for the wake-up.

ORT can instead share one process-wide pool (``thread_pool="global"``:
``onnxruntime.set_global_thread_pool_sizes`` + ``use_per_session_threads=False``). That
pool keeps ORT's default spinning, but there is only one of it. Measured: on a quiet
machine it was a little faster (1024x4096 modules, batch 1: 1.20 ms vs 1.30 ms per
routed call); with other processes busy it was 2x slower (4.8 ms vs 2.3 ms), its
spinning fighting them. It is also a process-wide switch (every later session in the
process must use it too; ORT refuses otherwise), so it is opt-in, not the default.

IO binding was measured slower than ``run`` on CPU (21.5 µs vs 14.3 µs per call for a
4-row module), so graphs are run with plain ``run`` and pre-built output names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modrt._exceptions import ProviderError
from modrt.bundle import GraphSpec, Manifest
from modrt.runtime import errors
from modrt.runtime import providers as prov

if TYPE_CHECKING:
    import onnxruntime as ort

THREAD_POOLS = ("session", "global")


def cores() -> int:
    """CPU cores this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class SessionConfig:
    """ONNX Runtime session settings shared by all graphs of a bundle."""

    threads: int = 0  # intra-op threads for large graphs; 0: cores()
    # Graphs whose largest weight is smaller run on one thread: waking a second thread
    # costs more than it saves (measured above). 0: every graph gets ``threads``.
    small_graph_bytes: int = 4 << 20
    spinning: bool = False  # let idle intra-op threads spin (only sensible with one session)
    thread_pool: str = "session"  # session: a pool per session | global: one per process
    optimization: str = "all"  # graph optimisation level: disable | basic | extended | all

    def __post_init__(self) -> None:
        if self.threads < 0 or self.small_graph_bytes < 0:
            raise ValueError(
                f"threads and small_graph_bytes must be >= 0, got {self.threads}, {self.small_graph_bytes}")
        if self.thread_pool not in THREAD_POOLS:
            raise ValueError(f"thread_pool {self.thread_pool!r} unknown; allowed {THREAD_POOLS}")
        if self.optimization not in _LEVELS:
            raise ValueError(f"optimization {self.optimization!r} unknown; allowed {tuple(_LEVELS)}")

    @property
    def intra_threads(self) -> int:
        return self.threads or cores()

    def threads_for(self, graph_bytes: int) -> int:
        return 1 if graph_bytes < self.small_graph_bytes else self.intra_threads


_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
           "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


# ORT's process-wide pool is process state; this mirrors its size once created.
_GLOBAL_POOL: list[int] = []


def _global_pool(threads: int) -> None:
    import onnxruntime as ort

    if not _GLOBAL_POOL:
        ort.set_global_thread_pool_sizes(threads, 1)
        _GLOBAL_POOL.append(threads)
    elif _GLOBAL_POOL[0] != threads:
        raise ProviderError(
            f"the process-wide thread pool has {_GLOBAL_POOL[0]} threads; "
            f"cannot resize it to {threads}")


def session_options(cfg: SessionConfig, graph_bytes: int | None = None) -> ort.SessionOptions:
    """``onnxruntime.SessionOptions`` for one graph of ``graph_bytes`` (None: a large one)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[cfg.optimization])
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # errors only; ORT's warnings would bypass our one-line errors
    if cfg.thread_pool == "global":
        _global_pool(cfg.intra_threads)
        so.use_per_session_threads = False
        return so
    so.intra_op_num_threads = cfg.intra_threads if graph_bytes is None else cfg.threads_for(graph_bytes)
    so.inter_op_num_threads = 1
    spin = "1" if cfg.spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return so


def fast_run(session: Any):
    """``session.run`` without its Python-side checks: ``InferenceSession.run`` first checks
    the feed names against the graph's inputs in Python (2-5 µs of a 7-12 µs call on a small
    graph, measured; a routed batch-1 image makes 12 calls, a PTB window 70), which the
    compiled run checks again. The feeds come from modrt's own validated arrays. Returns
    ``run(output_names, feeds, run_options)``; falls back to the public method if this
    onnxruntime lays its wrapper out differently. A GPU provider's failure at run time is
    then raised (a ``ModrtError`` naming the graph) instead of the public method's silent
    retry on the CPU."""
    inner = getattr(session, "_sess", None)
    run = getattr(inner, "run", None)
    return run if callable(run) else session.run


class Graph:
    """One graph's session: call it with ``{input name: array}``, get the outputs' list."""

    __slots__ = ("name", "spec", "session", "input_names", "output_names", "_run")

    def __init__(self, name: str, spec: GraphSpec, session: Any):
        self.name = name
        self.spec = spec
        self.session = session
        self.input_names = [t.name for t in spec.inputs]
        self.output_names = [t.name for t in spec.outputs]
        self._run = fast_run(session)

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self._run(self.output_names, feeds, None)
        except Exception as exc:  # errors.running's conversion, inline on this hot path
            raise errors.convert(f"graph {self.name!r}", self._cause(exc, feeds)) from exc

    def _cause(self, exc: Exception, feeds: dict[str, np.ndarray]) -> Exception:
        """A feed missing is the caller's input (the compiled run reports it as a node's
        failure, where the public one raised ValueError before running)."""
        missing = [n for n in self.input_names if n not in feeds]
        return ValueError(f"required inputs {missing} are missing from the feeds {sorted(feeds)}") if missing else exc

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())


class Sessions(Mapping[str, Graph]):
    """Every graph of a bundle as a ``Graph``, sessions created once, at construction."""

    def __init__(
        self,
        directory: str | os.PathLike,
        manifest: Manifest,
        provider: prov.ProviderConfig | None = None,
        config: SessionConfig | None = None,
        names: list[str] | None = None,
    ):
        import onnxruntime as ort

        self.provider_config = provider or prov.ProviderConfig()
        self.config = config or SessionConfig()
        self.provider = prov.resolve(self.provider_config.name)
        cache = None
        if self.provider == prov.PROVIDERS["tensorrt"]:
            cache = (Path(self.provider_config.cache_dir) if self.provider_config.cache_dir
                     else prov.default_cache_dir(directory, manifest))
        self.cache_dir = cache
        self._graphs: dict[str, Graph] = {}
        for name in names if names is not None else list(manifest.graphs):
            spec = manifest.graphs[name]
            path = Path(directory) / spec.file
            plist = prov.providers_for(self.provider, spec, self.provider_config, cache)
            options = session_options(self.config, self._work_bytes(path))
            with errors.loading(str(path)):
                sess = ort.InferenceSession(str(path), options, providers=[p for p, _ in plist],
                                            provider_options=[o for _, o in plist])
            self._graphs[name] = Graph(name, spec, sess)

    def _work_bytes(self, path: Path) -> int:
        """The largest weight in the graph, in float32 bytes (4 per element, whatever its
        dtype): what one op works through per call, the thing that decides whether a second
        thread pays. (A dense graph of 15 small modules is big but each of its MatMuls is
        small: measured 341 µs on 1 thread, 434 µs on 2.) An int8 weight counts as the
        float32 one it replaces: its MatMul does as many multiply-adds (measured: PTB's int8
        head at batch 64 x 35 took 98 ms on 1 thread, 49 ms on 2)."""
        size = path.stat().st_size
        if 4 * size < self.config.small_graph_bytes:
            return 4 * size  # no weight can be larger than the file
        import onnx

        g = onnx.load(str(path), load_external_data=False).graph
        return max((4 * int(np.prod(t.dims)) for t in g.initializer), default=0)

    def __getitem__(self, name: str) -> Graph:
        return self._graphs[name]

    def __iter__(self):
        return iter(self._graphs)

    def __len__(self) -> int:
        return len(self._graphs)

    @property
    def used(self) -> str:
        """The provider the sessions actually run on first (ORT may have fallen back)."""
        firsts = {g.providers[0] for g in self._graphs.values()}
        return firsts.pop() if len(firsts) == 1 else ",".join(sorted(firsts))


__all__ = ["SessionConfig", "Sessions", "Graph", "session_options", "cores", "THREAD_POOLS"]
