"""Start a real ``tritonserver`` on 127.0.0.1 with a repository, for tests and benchmarks.

The server is the one the ``nvidia-pytriton`` wheel ships (Triton with the Python backend,
no containers). That wheel wants numpy<2, so it lives in a virtualenv of its own, given
as ``python`` (its interpreter); the Python backend's stub runs in that environment, so it
also needs ``onnxruntime`` there for ``--onnx-backend python`` models and the router's
local mode. Set it up with::

    python -m venv .triton-venv
    .triton-venv/bin/pip install nvidia-pytriton 'numpy<2' onnxruntime

    with TritonServer(repo, python=".triton-venv/bin/python") as srv:
        srv.http_url, srv.grpc_url, srv.metrics_url
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from modrt._exceptions import ModrtError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def locate(python: str | os.PathLike) -> dict[str, Path | str]:
    """Where the pytriton wheel of ``python``'s environment keeps Triton. ModrtError when
    that interpreter has no pytriton."""
    code = ("import pytriton, sys; print(pytriton.__path__[0]); "
            "print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
    try:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ModrtError(f"{python}: cannot import pytriton (pip install nvidia-pytriton there)") from exc
    root, version = out.stdout.split()
    root = Path(root)
    dist = root / "tritonserver"
    libs = root / "tritonserver" / "external_libs"
    if not libs.is_dir():
        libs = root.parent / "nvidia_pytriton.libs"
    return {"dist": dist, "libs": libs, "version": version, "bin": Path(python).parent}


class TritonServer:
    """A ``tritonserver`` process serving ``repo`` on free loopback ports."""

    def __init__(self, repo: str | os.PathLike, python: str | os.PathLike, log: str | os.PathLike | None = None,
                 timeout: float = 120.0):
        from modrt.triton.repository import models_dir

        self.repo = models_dir(repo).resolve()
        self.where = locate(python)
        self.timeout = timeout
        self.log_path = Path(log) if log else None
        self.proc: subprocess.Popen | None = None
        self._tmp: str | None = None
        self.http_port, self.grpc_port, self.metrics_port = _free_port(), _free_port(), _free_port()

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> TritonServer:
        w = self.where
        self._tmp = tempfile.mkdtemp(prefix="modrt-triton-")
        dist = Path(self._tmp) / "tritonserver"
        shutil.copytree(w["dist"], dist, ignore=shutil.ignore_patterns("python_backend_stubs"))
        shutil.copy(w["dist"] / "python_backend_stubs" / w["version"] / "triton_python_backend_stub",
                    dist / "backends" / "python" / "triton_python_backend_stub")
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (str(w["libs"]), env.get("LD_LIBRARY_PATH")) if p)
        env["PATH"] = f"{w['bin']}:{env['PATH']}"
        cmd = [str(dist / "bin" / "tritonserver"), "--model-repository", str(self.repo),
               "--backend-directory", str(dist / "backends"),
               "--model-control-mode", "explicit", *self._load_args(),
               "--http-address", "127.0.0.1", "--http-port", str(self.http_port),
               "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc_port),
               "--metrics-address", "127.0.0.1", "--metrics-port", str(self.metrics_port),
               "--allow-metrics", "true", "--log-verbose", "0",
               "--backend-config", f"python,shm-region-prefix-name=modrt{os.getpid()}{self.http_port}"]
        out = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ModrtError(f"tritonserver exited with {self.proc.returncode} at start"
                                 + (f" (log: {self.log_path})" if self.log_path else ""))
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise ModrtError(f"tritonserver not ready after {self.timeout:.0f} s")

    def _load_args(self) -> list[str]:
        """Every model directory (one with a config.pbtxt)."""
        models = sorted(p.name for p in self.repo.iterdir() if (p / "config.pbtxt").is_file())
        return [a for m in models for a in ("--load-model", m)]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["TritonServer", "locate"]
