"""``ServeConfig``: everything ``modrt serve`` is told, one frozen dataclass (click fills it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from modrt.runtime.auto import STRATEGIES
from modrt.serve.batcher import BatchConfig

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"  # loopback by default: exposing a server is a decision
    port: int = 9000  # 0: any free port (the chosen one is printed)
    grpc_port: int | None = None  # the KServe v2 gRPC front-end beside HTTP (0: any free port); None: none
    model_name: str | None = None  # None: the manifest's task name
    batch: BatchConfig = field(default_factory=BatchConfig)  # dynamic batching (max_batch, queue delay)
    provider: str = "auto"
    strategy: str = "auto"  # auto | host | graph | fused (modrt.load)
    max_request_bytes: int = 64 * 2**20  # larger bodies get 413
    max_tokens: int = 8192  # positions a request (rows x time steps; rows feed-forward); more get 413
    max_response_bytes: int = 64 * 2**20  # larger answers (estimated from the header) get 400
    watch: float | None = None  # seconds between looks at the bundle's manifest (None: no watching)
    log_level: str = "warning"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.grpc_port is not None and not 0 <= self.grpc_port <= 65535:
            raise ValueError(f"grpc_port must be in [0, 65535], got {self.grpc_port}")
        if self.grpc_port and self.grpc_port == self.port:
            raise ValueError(f"the HTTP and the gRPC port are both {self.port}")
        for name in ("max_request_bytes", "max_tokens", "max_response_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r} unknown; allowed {STRATEGIES}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level {self.log_level!r} unknown; allowed {LOG_LEVELS}")


__all__ = ["LOG_LEVELS", "ServeConfig"]
