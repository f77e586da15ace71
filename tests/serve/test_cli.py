"""``modrt serve`` as a user runs it: a subprocess, real signals, real ports."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from modrt.serve.binary import HEADER


def start(*args: str) -> tuple[subprocess.Popen, str]:
    """``modrt serve ARGS --port 0``; returns the process and its URL (from its first line)."""
    p = subprocess.Popen([sys.executable, "-m", "modrt", "serve", *args, "--port", "0"],
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = p.stderr.readline()
    m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not m:
        p.kill()
        pytest.fail(f"no URL in {line!r}: {p.stderr.read()}")
    url = m.group(0)
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return p, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            p.kill()
            pytest.fail("server did not become ready")
        time.sleep(0.05)


def test_bad_bundle_is_one_red_line_before_binding(tmp_path):
    r = subprocess.run([sys.executable, "-m", "modrt", "serve", str(tmp_path), "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "manifest" in lines[0], r.stderr


def test_port_in_use_is_one_line(lm_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "modrt", "serve", str(lm_dir), "--port", str(port)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_bad_option_is_usage_error(lm_dir):
    r = subprocess.run([sys.executable, "-m", "modrt", "serve", str(lm_dir), "--max-batch", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "max_batch" in r.stderr


def test_serve_then_sigterm_finishes_in_flight_requests(lm_dir):
    """A long queue delay keeps requests in flight while SIGTERM arrives: all are answered.
    (The 3 s delay leaves a loaded machine time to deliver the requests before the signal;
    with 0.5 s, a run beside two trainings saw all four arrive after it and get 503.)"""
    p, url = start(str(lm_dir), "--model-name", "ptb", "--max-queue-delay-us", "3000000", "--max-batch", "64")
    try:
        meta = httpx.get(f"{url}/v2/models/ptb", timeout=5).json()
        assert meta["name"] == "ptb" and meta["inputs"][0]["name"] == "tokens"
        body = {"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]}],
                "outputs": [{"name": "next_token", "parameters": {"binary_data": True}}]}
        results: list = []

        def post():
            results.append(httpx.post(f"{url}/v2/models/ptb/infer", json=body, timeout=20))

        threads = [threading.Thread(target=post) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # the requests now wait in the batcher's queue
        p.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
    assert [r.status_code for r in results] == [200] * 4
    r = results[0]
    n = int(r.headers[HEADER])
    assert json.loads(r.content[:n])["outputs"][0]["parameters"]["binary_data_size"] == 3 * 8


def test_serve_never_imports_torch_train_or_export(lm_dir):
    code = f"""
import sys
from click.testing import CliRunner
from modrt.cli import cli
assert CliRunner().invoke(cli, ['serve', '--help']).exit_code == 0
import modrt, modrt.serve.app, modrt.serve.cli
from modrt.serve.dataplane import DataPlane
DataPlane(modrt.load({str(lm_dir)!r}))
print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith(('modrt.train', 'modrt.export'))))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_keep_alive_requests_are_not_delayed_by_nagle(lm_server):
    """The listening socket says TCP, so asyncio sets TCP_NODELAY on each connection:
    keep-alive requests take about a millisecond, not the ~40 ms of Nagle + delayed ACK."""
    with httpx.Client(base_url=lm_server.url, timeout=20) as c:
        c.get("/v2/health/live")
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            assert c.get("/v2/health/live").status_code == 200
            times.append(time.perf_counter() - t0)
    assert sorted(times)[2] < 0.03, times


@pytest.mark.parametrize("missing", ["uvicorn", "fastapi", "orjson"])
def test_without_the_serve_extra_one_line_names_it(lm_dir, missing):
    """The web stack absent (as without `pip install 'modrt[serve]'`): --help still works and
    serving says which extra to install, in one line, exit 1."""
    code = (f"import sys; sys.modules[{missing!r}] = None; sys.argv = ['modrt', *sys.argv[1:]]; "
            "from modrt.cli import main; main()")
    p = subprocess.run([sys.executable, "-c", code, "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "KServe v2" in p.stdout, p.stderr
    p = subprocess.run([sys.executable, "-c", code, "serve", str(lm_dir), "--port", "0"], capture_output=True,
                       text=True, timeout=60)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert f"needs the serve extra ({missing} is not installed): pip install 'modrt[serve]'" in lines[0]


def test_grpc_port_serves_grpc_beside_http_and_in_use_is_one_line(lm_dir):
    import tritonclient.grpc as tg

    p, url = start(str(lm_dir), "--grpc-port", "0")
    try:
        line = p.stderr.readline()  # the gRPC line comes once the loop has bound it
        m = re.search(r"gRPC \(KServe v2\) on 127\.0\.0\.1:(\d+)", line)
        assert m, line
        c = tg.InferenceServerClient(f"127.0.0.1:{m.group(1)}")
        name = httpx.get(f"{url}/v2/models/stats", timeout=5).json()["model_stats"][0]["name"]
        assert c.is_model_ready(name)
        x = tg.InferInput("tokens", [1, 3], "INT64")
        x.set_data_from_numpy(np.array([[1, 2, 3]], np.int64))
        assert c.infer(name, [x]).as_numpy("next_token").shape == (1, 3)
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "modrt", "serve", str(lm_dir), "--port", "0", "--grpc-port",
                            str(port)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"



def test_grpc_port_without_grpcio_names_the_extra(lm_dir):
    code = ("import sys; sys.modules['grpc'] = None; sys.argv = ['modrt', *sys.argv[1:]]; "
            "from modrt.cli import main; main()")
    p = subprocess.run([sys.executable, "-c", code, "serve", str(lm_dir), "--port", "0", "--grpc-port", "0"],
                       capture_output=True, text=True, timeout=60)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert "--grpc-port needs the serve extra (grpc is not installed)" in lines[0]
