"""Prometheus metrics for ``/metrics``, in a registry of their own (one per server).

    modrt_requests_total{model}                       inference requests answered
    modrt_request_failures_total{model, code}         requests answered with an error
    modrt_request_duration_seconds{model}             end-to-end latency (histogram)
    modrt_queue_duration_seconds{model}               time spent waiting for a batch
    modrt_batch_size{model}                           rows per runtime call (histogram)
    modrt_module_selections_total{model, layer, module}  routing decisions: how often each
                                                      module of each modular layer served
"""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The server's metrics; ``render()`` gives the text exposition format."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model: str, layers: list[str]):
        self.model = model
        self.layers = layers
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("modrt_requests", "Inference requests answered.", ["model"], registry=r)
        self.failures = Counter("modrt_request_failures", "Inference requests answered with an error.",
                                ["model", "code"], registry=r)
        self.latency = Histogram("modrt_request_duration_seconds", "End-to-end inference latency.",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("modrt_queue_duration_seconds", "Time a request waited for its batch.",
                               ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("modrt_batch_size", "Rows per runtime call (dynamic batching).",
                               ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.selections = Counter("modrt_module_selections", "Routing decisions: times a module was selected.",
                                  ["model", "layer", "module"], registry=r)
        # Children with their labels bound once (labels() is a dict lookup under a lock per call).
        self._requests, self._latency = self.requests.labels(model), self.latency.labels(model)
        self._queue, self._batch = self.queue.labels(model), self.batch.labels(model)
        self._selections: dict[tuple[int, int], Counter] = {}

    def observe_request(self, seconds: float, queue_seconds: float) -> None:
        self._requests.inc()
        self._latency.observe(seconds)
        self._queue.observe(queue_seconds)

    def observe_failure(self, code: int) -> None:
        self.failures.labels(self.model, str(code)).inc()

    def observe_batch(self, rows: int) -> None:
        self._batch.observe(rows)

    def observe_routing(self, modules: np.ndarray) -> None:
        """``modules``: int (..., L, K) routing decisions of one request or batch."""
        per_layer = modules.reshape(-1, modules.shape[-2], modules.shape[-1])  # (N, L, K)
        for l in range(len(self.layers)):
            counts = np.bincount(per_layer[:, l, :].ravel())
            for m in np.flatnonzero(counts).tolist():
                child = self._selections.get((l, m))
                if child is None:
                    child = self._selections[l, m] = self.selections.labels(self.model, self.layers[l], str(m))
                child.inc(int(counts[m]))

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["Metrics"]
