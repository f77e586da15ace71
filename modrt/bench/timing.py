"""The timing loop of ``modrt bench``: what to measure (``BenchConfig``), the interleaved
measurement (``measure``) and the latency statistics of one variant (``stats``).

Variants are measured *interleaved* (``modrt.runtime.timing``, the loop auto's choice uses
too): round after round, each runs for a short block (``BenchConfig.block``), until every
one has had its time budget (``seconds``). Background load then hits all of them alike, so
the ratios hold even when absolute numbers are noisy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from modrt.runtime.auto import STRATEGIES
from modrt.runtime.timing import interleaved

STRATEGY_CHOICES = STRATEGIES  # auto | host | graph | fused


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and for how long."""

    batches: tuple[int, ...] = (1, 8, 64)
    seq: int = 35  # tokens per window for recurrent bundles
    seconds: float = 2.0  # measured time per variant and batch size
    block: float = 0.25  # seconds a variant runs before the next one's turn
    warmup: int = 3  # unmeasured calls per variant and batch size
    inputs: int = 32  # distinct inputs per batch size, cycled through
    min_iters: int = 5
    max_iters: int = 100_000
    provider: str = "auto"
    threads: int = 0  # intra-op threads per session; 0: all cores
    thread_pool: str = "session"
    torch: bool = True
    ort_moe: bool = True
    bound: bool = True
    strategy: str = "auto"  # how the routed bundle runs its modular layers (modrt.load)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGY_CHOICES:
            raise ValueError(f"strategy {self.strategy!r} unknown; choose one of {', '.join(STRATEGY_CHOICES)}")
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {list(self.batches)}")
        if self.seq < 1 or self.seconds <= 0 or self.warmup < 0 or self.min_iters < 1:
            raise ValueError("need seq >= 1, seconds > 0, warmup >= 0, min_iters >= 1")


def measure(
    fns: dict[str, Callable[[], object]],
    cfg: BenchConfig,
    on_done: Callable[[str], None] = lambda name: None,
) -> dict[str, np.ndarray]:
    """Interleaved timing (``runtime.timing.interleaved``); the per-call latencies in ns of
    every variant."""
    return interleaved(fns, int(cfg.seconds * 1e9), int(cfg.block * 1e9), min_calls=cfg.min_iters,
                       max_calls=cfg.max_iters, warmup=cfg.warmup, on_done=on_done)


def stats(ns: np.ndarray, batch: int, seq: int | None = None) -> dict[str, float]:
    us = ns / 1e3
    p50, p90, p95, p99 = np.percentile(us, [50, 90, 95, 99])
    rows_per_s = batch * len(ns) / (ns.sum() / 1e9)
    out = {"p50_us": round(float(p50), 1), "p90_us": round(float(p90), 1),
           "p95_us": round(float(p95), 1), "p99_us": round(float(p99), 1),
           "infer_per_s": round(float(rows_per_s), 1)}
    if seq is not None:
        out["tokens_per_s"] = round(float(rows_per_s * seq), 1)
    return out


__all__ = ["BenchConfig", "STRATEGY_CHOICES", "measure", "stats"]
