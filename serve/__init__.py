"""``modrt.serve``: the KServe v2 / Open Inference Protocol over modrt's routed runtime.

    modrt serve OUT/ --port 9000

    app.py        FastAPI routes (metadata, health, stats, metrics, OpenAPI)
    errors.py     serve's exceptions, the status of every error, the handlers
    fastpath.py   the infer route on bare ASGI (the hot path)
    dataplane.py  metadata, readiness, validated inference (no HTTP)
    batcher.py    dynamic batching
    binary.py     JSON header + binary tensor data bodies
    protocol.py   the spec's JSON shapes (pydantic), datatype table
    metrics.py    Prometheus /metrics;  stats.py  Triton statistics extension
    cli.py        ``modrt serve``

Imports only modrt's torch-free core (never ``modrt.train`` or ``modrt.export``). The
web stack is the ``serve`` extra: ``pip install 'modrt[serve]'``.
"""

from __future__ import annotations

from modrt.serve.batcher import BatchConfig
from modrt.serve.config import ServeConfig

__all__ = ["BatchConfig", "ServeConfig"]
