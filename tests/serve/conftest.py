"""Tiny random bundles (no torch) and a real uvicorn server on a free loopback port."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

import modrt
from modrt import synthetic, synthetic_lm
from modrt.serve.app import create_app
from modrt.serve.batcher import BatchConfig
from modrt.serve.cli import bind
from modrt.serve.dataplane import DataPlane

VOCAB = 40


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory) -> Path:
    """A recurrent PTB-like bundle: vocab 40, M=5, K=2."""
    return synthetic_lm.build(tmp_path_factory.mktemp("serve-lm"), vocab=VOCAB, modules=5, k=2,
                              embedding=8, hidden=12, seed=1)


@pytest.fixture(scope="session")
def ff_dir(tmp_path_factory) -> Path:
    """A feed-forward bundle: x FP32 [-1, 8] -> y FP32 [-1, 8], M=6, K=1."""
    return synthetic.build(tmp_path_factory.mktemp("serve-ff"), modules=6, k=1, dims=(8, 16, 8))


@pytest.fixture(scope="session")
def lm_model(lm_dir):
    return modrt.load(lm_dir, provider="cpu", threads=1)


@pytest.fixture(scope="session")
def ff_model(ff_dir):
    return modrt.load(ff_dir, provider="cpu", threads=1)


class ServerThread:
    """uvicorn serving ``create_app(plane)`` in a thread on 127.0.0.1:<free port>."""

    def __init__(self, plane: DataPlane, max_request_bytes: int = 1 << 20, grpc: bool = False):
        self.plane = plane
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc = None
        if grpc:  # the gRPC front-end on a free port (self.grpc.port once started)
            from modrt.serve.grpc_server import GrpcServer

            self.grpc = GrpcServer(plane, "127.0.0.1", 0, max_request_bytes, 64 << 20)
        config = uvicorn.Config(create_app(plane, max_request_bytes, self.grpc), log_level="critical")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        self.sock.close()


@pytest.fixture(scope="session")
def server_thread():
    """``server_thread(plane)``: a context manager serving ``plane`` live (``ServerThread``)."""
    return ServerThread


@pytest.fixture(scope="module")
def lm_server(lm_model):
    """A live server for the recurrent bundle (model name ``lm``), batching up to 16 rows."""
    with ServerThread(DataPlane(lm_model, "lm", BatchConfig(max_batch=16, max_queue_delay_us=2000))) as s:
        yield s


@pytest.fixture(scope="module")
def ff_server(ff_model):
    """A live server for the feed-forward bundle (model name from the manifest: ``synthetic``)."""
    with ServerThread(DataPlane(ff_model, None, BatchConfig(max_batch=8, max_queue_delay_us=2000))) as s:
        yield s


@pytest.fixture
def client(lm_server):
    with httpx.Client(base_url=lm_server.url, timeout=20) as c:
        yield c
