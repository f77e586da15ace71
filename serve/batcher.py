"""Dynamic batching: concurrent requests merged into one run of the routed runtime.

    submit(feeds, want, cost) ──► pending ──► worker: wait until max_batch rows are
                               pending or the oldest has waited max_queue_delay, take them,
                               group by key (rows that can be concatenated),
                               run each group once (in one worker thread), split back

A job is a dict of input arrays that share their first (batch) axis. Its ``key`` says which
jobs may share a run: the names of its inputs and the shape of a row of each
(``x.shape[1:]``). For the recurrent model that is the sequence length T (and whether a
start state ``h`` is given), so sequences of different lengths never share a run and
nothing is padded: a request's outputs are what it would get alone (routing is per row).
A run computes the union of the outputs its jobs ``want`` (None: all), and holds at most
``max_batch`` rows and ``max_cost`` cost (the server's cost: positions to compute), so the
work and memory of one run stay bounded; a single larger job runs alone. Requests are
validated before they reach the queue, so one bad request cannot fail a batch.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from modrt.serve.errors import BatcherClosedError

Feeds = dict[str, np.ndarray]
RunFn = Callable[[Feeds, frozenset[str] | None, Any], dict[str, np.ndarray]]


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
    feeds: Feeds
    want: frozenset[str] | None
    cost: int
    key: tuple
    future: asyncio.Future
    rows: int
    context: Any = None
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)


@dataclass(frozen=True)
class BatchConfig:
    max_batch: int = 32  # rows per run; a single larger request runs alone
    max_queue_delay_us: int = 1000  # how long the first job waits for company
    max_cost: int | None = None  # cost (the server's: positions) per run; a single larger job runs alone

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_cost is not None and self.max_cost < 1:
            raise ValueError(f"max_cost must be >= 1, got {self.max_cost}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")


class Batcher:
    """Pending jobs + one worker task; ``run`` executes in a single dedicated thread.

    The event loop only queues, groups and hands over: while the thread runs one batch,
    the loop keeps accepting and parsing requests, which join the next batch. A batch
    goes as soon as it holds ``max_batch`` rows, or when its oldest job has waited
    ``max_queue_delay_us`` since it was submitted (time spent behind a running batch
    counts, so at high load a batch leaves as soon as the previous one is done).
    """

    def __init__(self, run: RunFn, config: BatchConfig | None = None,
                 on_batch: Callable[[int, list[Timing]], None] | None = None):
        self._run = run
        self.config = config or BatchConfig()
        self._on_batch = on_batch
        self._pending: deque[_Job] = deque()
        self._rows = 0  # rows in _pending
        self._wake: asyncio.Event | None = None
        self._idle = False  # the worker waits for any job (else only for a full batch)
        self._closing = False
        self._worker: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="modrt-infer")

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._closing

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._closing = False
        self._worker = asyncio.create_task(self._loop(), name="modrt-batcher")

    async def stop(self) -> None:
        """Refuse new jobs, finish every pending one, then stop the worker."""
        if self._worker is None:
            return
        self._closing = True
        self._wake.set()
        await self._worker
        self._worker = None
        self._pool.shutdown(wait=True)

    async def submit(self, feeds: Feeds, want: frozenset[str] | None = None, cost: int | None = None,
                     context: Any = None) -> Result:
        """Run ``feeds`` (arrays sharing their first axis) in some batch; ``want``: the
        outputs needed (None: all); ``cost``: its share of a run's ``max_cost`` (rows);
        ``context``: passed to ``run`` with the batch, and only jobs of one context share a
        batch (the server's: the model a request was decoded against)."""
        if not self.running:
            raise BatcherClosedError("the model is not ready (the server is stopping)")
        rows = int(next(iter(feeds.values())).shape[0])
        key = (id(context), *((k, v.shape[1:]) for k, v in feeds.items()))
        job = _Job(feeds, want, rows if cost is None else cost, key, asyncio.get_running_loop().create_future(), rows,
                   context)
        self._pending.append(job)
        self._rows += job.rows
        if self._idle or self._rows >= self.config.max_batch:
            self._wake.set()
        return await job.future

    # --- worker ----------------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        delay_ns = self.config.max_queue_delay_us * 1000
        while True:
            if not self._pending:
                if self._closing:
                    break
                self._wake.clear()
                self._idle = True
                await self._wake.wait()
                self._idle = False
                continue
            while self._rows < self.config.max_batch and not self._closing:
                wait_s = (self._pending[0].enqueued_ns + delay_ns - time.perf_counter_ns()) / 1e9
                if wait_s <= 0:
                    break
                self._wake.clear()
                timer = loop.call_later(wait_s, self._wake.set)
                await self._wake.wait()
                timer.cancel()
            jobs, rows = [], 0
            while self._pending and (not jobs or rows + self._pending[0].rows <= self.config.max_batch):
                job = self._pending.popleft()
                jobs.append(job)
                rows += job.rows
            self._rows -= rows
            for batch in self._plan(jobs):
                await self._execute(loop, batch)

    def _plan(self, jobs: list[_Job]) -> list[list[_Job]]:
        """Group by key, in arrival order, into runs of at most max_batch rows and max_cost."""
        groups: dict[tuple, list[list[_Job]]] = {}
        limit = self.config.max_cost
        for job in jobs:
            runs = groups.setdefault(job.key, [[]])
            last = runs[-1]
            if last and (sum(j.rows for j in last) + job.rows > self.config.max_batch
                         or (limit is not None and sum(j.cost for j in last) + job.cost > limit)):
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
        if len(jobs) == 1:
            feeds, want = jobs[0].feeds, jobs[0].want
        else:
            feeds = {k: np.concatenate([j.feeds[k] for j in jobs]) for k in jobs[0].feeds}  # (B, ...)
            want = None if any(j.want is None for j in jobs) else frozenset().union(*(j.want for j in jobs))
        t1 = time.perf_counter_ns()
        out = self._run(feeds, want, jobs[0].context)
        t2 = time.perf_counter_ns()
        bounds = np.cumsum([0] + [j.rows for j in jobs])
        split = [{k: v[a:b] for k, v in out.items()} for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        t3 = time.perf_counter_ns()
        B = int(bounds[-1])
        timings = [Timing(t0 - j.enqueued_ns, t1 - t0, t2 - t1, t3 - t2, B) for j in jobs]
        return split, timings


__all__ = ["BatchConfig", "Batcher", "BatcherClosedError", "Result", "Timing"]
