"""The one timing loop: ``modrt bench`` and ``auto``'s strategy choice both measure with it.

Candidates are measured *interleaved*: round after round, each runs for a block of time
(``block_ns``), until every one has spent its budget (``budget_ns`` of measured calls, at
least ``min_calls``, at most ``max_calls``). Background load then hits all of them alike,
and a candidate's weights stay in cache within its block, as they do when one strategy
serves (calls interleaved one by one would make every candidate read its weights from
memory). The garbage collector is off while timing: a collection inside one timed call
is noise, not the runtime's cost.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import numpy as np


def interleaved(fns: dict[str, Callable[[], object]], budget_ns: int, block_ns: int, *, min_calls: int = 1,
                max_calls: int = 100_000, warmup: int = 1,
                on_done: Callable[[str], None] = lambda name: None) -> dict[str, np.ndarray]:
    """Per-call latencies in ns of every candidate (each called with no argument)."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    samples: dict[str, list[int]] = {k: [] for k in fns}
    spent = dict.fromkeys(fns, 0)
    active = list(fns)
    clock = time.perf_counter_ns
    gc_was = gc.isenabled()
    gc.disable()
    try:
        while active:
            for name in list(active):
                f, s = fns[name], samples[name]
                end = clock() + block_ns
                while True:
                    t0 = clock()
                    f()
                    dt = clock() - t0
                    s.append(dt)
                    spent[name] += dt
                    if (spent[name] >= budget_ns and len(s) >= min_calls) or len(s) >= max_calls:
                        active.remove(name)
                        on_done(name)
                        break
                    if clock() >= end:
                        break
    finally:
        if gc_was:
            gc.enable()
    return {k: np.asarray(v, dtype=np.int64) for k, v in samples.items()}


__all__ = ["interleaved"]
