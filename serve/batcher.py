"""Dynamic batching: concurrent requests merged into one run of the routed runtime.

    submit(x) ──► queue ──► worker: take the first job, keep taking jobs until
                             max_batch rows or max_queue_delay has passed,
                             group by key (rows that can be concatenated),
                             run each group once (in one worker thread), split back

A job's ``key`` says which jobs may share a run: the shape of a row (``x.shape[1:]``).
For the recurrent model that is the sequence length T, so sequences of different
lengths never share a run and nothing is padded: a request's outputs are what it would
get alone (every row starts from the zero state, and routing is per row). Requests are
validated before they reach the queue, so one bad request cannot fail a batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

RunFn = Callable[[np.ndarray], dict[str, np.ndarray]]


class Timing(NamedTuple):
    """Where one request's time went, in nanoseconds (Triton's statistics categories)."""

    queue_ns: int
    input_ns: int  # concatenating the batch
    infer_ns: int  # the runtime
    output_ns: int  # splitting the outputs back
    batch_size: int  # rows in the run this request was part of


class Result(NamedTuple):
    outputs: dict[str, np.ndarray]
    timing: Timing


@dataclass
class _Job:
    x: np.ndarray
    key: tuple
    future: asyncio.Future
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class BatchConfig:
    max_batch: int = 32  # rows per run; a single larger request runs alone
    max_queue_delay_us: int = 1000  # how long the first job waits for company

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")


class Batcher:
    """Queue + one worker task; ``run`` executes in a single dedicated thread."""

    def __init__(self, run: RunFn, config: BatchConfig | None = None,
                 on_batch: Callable[[int, list[Timing]], None] | None = None):
        self._run = run
        self.config = config or BatchConfig()
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Job | None] | None = None
        self._worker: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="modrt-infer")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._loop(), name="modrt-batcher")

    async def stop(self) -> None:
        """Finish every queued job, then stop the worker."""
        if self._worker is None:
            return
        await self._queue.put(None)
        await self._worker
        self._worker = None
        self._pool.shutdown(wait=True)

    async def submit(self, x: np.ndarray) -> Result:
        if self._worker is None:
            raise RuntimeError("the batcher is not running")
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(x, tuple(x.shape[1:]), fut))
        return await fut

    # --- worker ----------------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            jobs, rows = [first], first.rows
            deadline = loop.time() + self.config.max_queue_delay_us / 1e6
            while rows < self.config.max_batch:
                try:
                    job = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        break
                    try:
                        job = await asyncio.wait_for(self._queue.get(), timeout)
                    except TimeoutError:
                        break
                if job is None:
                    stopping = True
                    break
                jobs.append(job)
                rows += job.rows
            for batch in self._plan(jobs):
                await self._execute(loop, batch)

    def _plan(self, jobs: list[_Job]) -> list[list[_Job]]:
        """Group by key, in arrival order, into runs of at most max_batch rows."""
        groups: dict[tuple, list[list[_Job]]] = {}
        for job in jobs:
            runs = groups.setdefault(job.key, [[]])
            if runs[-1] and sum(j.rows for j in runs[-1]) + job.rows > self.config.max_batch:
                runs.append([])
            runs[-1].append(job)
        return [run for runs in groups.values() for run in runs]

    async def _execute(self, loop: asyncio.AbstractEventLoop, jobs: list[_Job]) -> None:
        jobs = [j for j in jobs if not j.future.done()]  # a client that went away
        if not jobs:
            return
        try:
            outs, timings = await loop.run_in_executor(self._pool, self._run_batch, jobs)
        except Exception as exc:  # an internal failure: every job of this run learns of it
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(exc)
            return
        if self._on_batch is not None:
            self._on_batch(sum(j.rows for j in jobs), timings)
        for j, out, t in zip(jobs, outs, timings, strict=True):
            if not j.future.done():
                j.future.set_result(Result(out, t))

    def _run_batch(self, jobs: list[_Job]) -> tuple[list[dict[str, np.ndarray]], list[Timing]]:
        t0 = time.perf_counter_ns()
        x = jobs[0].x if len(jobs) == 1 else np.concatenate([j.x for j in jobs])  # (B, ...)
        t1 = time.perf_counter_ns()
        out = self._run(x)
        t2 = time.perf_counter_ns()
        bounds = np.cumsum([0] + [j.rows for j in jobs])
        split = [{k: v[a:b] for k, v in out.items()} for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        t3 = time.perf_counter_ns()
        timings = [Timing(t0 - j.enqueued_ns, t1 - t0, t2 - t1, t3 - t2, int(x.shape[0])) for j in jobs]
        return split, timings


__all__ = ["BatchConfig", "Batcher", "Result", "Timing"]
