"""Per-model inference statistics in the shape of Triton's statistics extension.

``GET /v2/models/{name}/stats`` answers ``{"model_stats": [{"name", "version",
"last_inference", "inference_count", "execution_count", "inference_stats": {"success",
"fail", "queue", "compute_input", "compute_infer", "compute_output"}, "batch_stats": [...]}]}``
where each duration is ``{"count": requests, "ns": total nanoseconds}``. Request-level
categories count requests; ``batch_stats`` counts runtime executions per batch size.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from modrt.serve.batcher import Timing
from modrt.serve.protocol import BatchStats, InferStats, ModelStats, StatDuration, StatsResponse


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += int(ns)

    def out(self) -> StatDuration:
        return StatDuration(count=self.count, ns=self.ns)


@dataclass
class _Batch:
    compute_input: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    compute_output: _Duration = field(default_factory=_Duration)


class Stats:
    """Counters updated by the data plane (requests) and the batcher (executions)."""

    def __init__(self, name: str, version: str = "1"):
        self.name, self.version = name, version
        self._lock = threading.Lock()
        self.last_inference_ms = 0
        self.inference_count = 0  # rows inferred
        self.execution_count = 0  # runtime calls
        self.success, self.fail, self.queue = _Duration(), _Duration(), _Duration()
        self.compute_input, self.compute_infer, self.compute_output = _Duration(), _Duration(), _Duration()
        self.batches: dict[int, _Batch] = {}

    def request_ok(self, total_ns: int, t: Timing) -> None:
        with self._lock:
            self.success.add(total_ns)
            self.queue.add(t.queue_ns)
            self.compute_input.add(t.input_ns)
            self.compute_infer.add(t.infer_ns)
            self.compute_output.add(t.output_ns)
            self.last_inference_ms = int(time.time() * 1000)

    def request_failed(self, total_ns: int) -> None:
        with self._lock:
            self.fail.add(total_ns)

    def execution(self, rows: int, timings: list[Timing]) -> None:
        t = timings[0]
        with self._lock:
            self.inference_count += rows
            self.execution_count += 1
            b = self.batches.setdefault(rows, _Batch())
            b.compute_input.add(t.input_ns)
            b.compute_infer.add(t.infer_ns)
            b.compute_output.add(t.output_ns)

    def response(self) -> StatsResponse:
        with self._lock:
            stats = ModelStats(
                name=self.name, version=self.version, last_inference=self.last_inference_ms,
                inference_count=self.inference_count, execution_count=self.execution_count,
                inference_stats=InferStats(
                    success=self.success.out(), fail=self.fail.out(), queue=self.queue.out(),
                    compute_input=self.compute_input.out(), compute_infer=self.compute_infer.out(),
                    compute_output=self.compute_output.out()),
                batch_stats=[BatchStats(batch_size=n, compute_input=b.compute_input.out(),
                                        compute_infer=b.compute_infer.out(),
                                        compute_output=b.compute_output.out())
                             for n, b in sorted(self.batches.items())])
        return StatsResponse(model_stats=[stats])


__all__ = ["Stats"]
