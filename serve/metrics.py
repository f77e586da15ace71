"""Prometheus metrics for ``/metrics``, in a registry of their own (one per server).

    modrt_requests_total{model, version}              inference requests answered
    modrt_request_failures_total{model, code}         requests answered with an error
    modrt_request_duration_seconds{model, version}    end-to-end latency (histogram)
    modrt_queue_duration_seconds{model, version}      time spent waiting for a batch
    modrt_batch_size{model}                           rows per runtime call (histogram)
    modrt_module_selections_total{model, version, layer, module}  routing decisions: how
                                                      often each module of each layer served

``version``: the bundle that answered (a digest of its manifest), so a reload's routing
and latency can be told from the old bundle's.
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

    def __init__(self, model: str):
        self.model = model
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("modrt_requests", "Inference requests answered.", ["model", "version"], registry=r)
        self.failures = Counter("modrt_request_failures", "Inference requests answered with an error.",
                                ["model", "code"], registry=r)
        self.latency = Histogram("modrt_request_duration_seconds", "End-to-end inference latency.",
                                 ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("modrt_queue_duration_seconds", "Time a request waited for its batch.",
                               ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("modrt_batch_size", "Rows per runtime call (dynamic batching).",
                               ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.selections = Counter("modrt_module_selections", "Routing decisions: times a module was selected.",
                                  ["model", "version", "layer", "module"], registry=r)
        # Children with their labels bound once (labels() is a dict lookup under a lock per call).
        self._by_version: dict[str, tuple] = {}
        self._batch = self.batch.labels(model)
        self._selections: dict[tuple[str, str, int], Counter] = {}

    def observe_request(self, seconds: float, queue_seconds: float, version: str) -> None:
        children = self._by_version.get(version)
        if children is None:
            m = self.model
            children = self._by_version[version] = (self.requests.labels(m, version),
                                                    self.latency.labels(m, version), self.queue.labels(m, version))
        children[0].inc()
        children[1].observe(seconds)
        children[2].observe(queue_seconds)

    def observe_failure(self, code: int) -> None:
        self.failures.labels(self.model, str(code)).inc()

    def observe_batch(self, rows: int) -> None:
        self._batch.observe(rows)

    def observe_routing(self, modules: np.ndarray, layers: list[str], version: str) -> None:
        """``modules``: int (..., L, K) routing decisions of one request or batch of the
        bundle ``version``, whose modular layers are ``layers``."""
        per_layer = modules.reshape(-1, modules.shape[-2], modules.shape[-1])  # (N, L, K)
        for l, layer in enumerate(layers):
            counts = np.bincount(per_layer[:, l, :].ravel())
            for m in np.flatnonzero(counts).tolist():
                child = self._selections.get((version, layer, m))
                if child is None:
                    child = self._selections[version, layer, m] = self.selections.labels(
                        self.model, version, layer, str(m))
                child.inc(int(counts[m]))

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["Metrics"]
