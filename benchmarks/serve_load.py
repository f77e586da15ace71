"""Load test of ``modrt serve``: dynamic batching vs max batch 1, over loopback HTTP.

For each server setting a real ``modrt serve`` subprocess is started on 127.0.0.1 (a free
port); a bounded number of requests (binary tensor data, one sequence each) is sent at
concurrency 1, 8 and 32 over keep-alive HTTP/1.1 connections. The client is cheap on
purpose (it shares the cores with the server): one thread per connection, a raw blocking
socket, the request bytes built once, and a response is checked by comparing its bytes
with the connection's reference answer (decoded once and compared with the in-process
runtime). Reported: p50/p99 latency, throughput, errors (non-200 or wrong answers), and
the CPU the client and the server used (100% = one core); and, at batch 1, the HTTP
overhead over calling the runtime in-process.

    python benchmarks/serve_load.py                      # random PTB-sized-ish LM bundle
    python benchmarks/serve_load.py --bundle out/ --requests 400 --json load.json
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import numpy as np

HEADER = "Inference-Header-Content-Length"
_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")
_HLEN = re.compile(rb"(?i)\r\ninference-header-content-length: *(\d+)")


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def request_bytes(path: str, tokens: np.ndarray) -> bytes:
    head = json.dumps({"inputs": [{"name": "tokens", "datatype": "INT64", "shape": list(tokens.shape),
                                   "parameters": {"binary_data_size": tokens.nbytes}}],
                       "outputs": [{"name": "next_token", "parameters": {"binary_data": True}}]}).encode()
    body = head + tokens.astype("<i8").tobytes()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            f"{HEADER}: {len(head)}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


class Connection:
    """One keep-alive HTTP/1.1 connection on a blocking socket: send bytes, read one response."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def roundtrip(self, req: bytes) -> tuple[int, bytes, bytes]:
        """(status, head, body)"""
        self.sock.sendall(req)
        while (i := self.buf.find(b"\r\n\r\n")) < 0:
            self._recv()
        head, self.buf = self.buf[:i + 2], self.buf[i + 4:]
        n = int(_LENGTH.search(head).group(1))
        while len(self.buf) < n:
            self._recv()
        body, self.buf = self.buf[:n], self.buf[n:]
        return int(head[9:12]), head, body

    def _recv(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def check_answer(head: bytes, body: bytes, want: np.ndarray) -> bool:
    """Does an infer response carry ``want`` as its binary next_token output?"""
    m = _HLEN.search(head)
    if not m:
        return False
    n = int(m.group(1))
    out = json.loads(body[:n])["outputs"][0]
    got = np.frombuffer(body[n:], "<i8").reshape(out["shape"])
    return out["name"] == "next_token" and np.array_equal(got, want)


def load(port: int, path: str, cases: list[tuple[bytes, np.ndarray]], concurrency: int, requests: int,
         seconds: float, server_pid: int | None = None) -> dict:
    """``requests`` requests over ``concurrency`` connections (connection i sends cases[i % len])."""
    lat: list[float] = []
    errors: list[str] = []
    per = -(-requests // concurrency)
    conns = [Connection(port) for _ in range(concurrency)]
    start = threading.Barrier(concurrency + 1)
    deadline = [0.0]

    def worker(i: int) -> None:
        req, want = cases[i % len(cases)]
        conn, mine, ref = conns[i], [], None
        start.wait()
        try:
            for _ in range(per):
                if time.perf_counter() > deadline[0]:
                    break
                t0 = time.perf_counter()
                status, head, body = conn.roundtrip(req)
                mine.append(time.perf_counter() - t0)
                if status != 200:
                    errors.append(f"HTTP {status}: {body[:200]!r}")
                elif ref is None:  # decode the first answer; later ones must be the same bytes
                    if check_answer(head, body, want):
                        ref = body
                    else:
                        errors.append("wrong answer")
                elif body != ref:
                    errors.append("wrong answer")
        except Exception as exc:  # noqa: BLE001 - a failed connection is an error of the run
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            lat.extend(mine)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    server = _proc(server_pid)
    s0 = sum(server.cpu_times()[:2]) if server else 0.0
    c0, t0 = time.process_time(), time.perf_counter()
    deadline[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join()
    wall, client_cpu = time.perf_counter() - t0, time.process_time() - c0
    server_cpu = sum(server.cpu_times()[:2]) - s0 if server else float("nan")
    for c in conns:
        c.close()
    return {"concurrency": concurrency, "requests": len(lat), "errors": len(errors), "error_sample": errors[:3],
            "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3, "infer_per_s": len(lat) / wall,
            "client_cpu_pct": 100 * client_cpu / wall, "server_cpu_pct": 100 * server_cpu / wall}


def _proc(pid: int | None):
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process(pid) if pid else None


def start_server(bundle: Path, name: str, max_batch: int, delay_us: int, extra: list[str] | None = None
                 ) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen([sys.executable, "-m", "modrt", "serve", str(bundle), "--port", "0", "--host", "127.0.0.1",
                          "--model-name", name, "--max-batch", str(max_batch), "--max-queue-delay-us", str(delay_us),
                          "--provider", "cpu", *(extra or [])], stderr=subprocess.PIPE, text=True)
    m = re.search(r"http://127\.0\.0\.1:(\d+)", p.stderr.readline())
    if not m:
        p.kill()
        raise SystemExit(f"server did not start: {p.stderr.read()}")
    return p, int(m.group(1))


def in_process(bundle: Path, tokens: list[np.ndarray], n: int = 200) -> tuple[float, list[np.ndarray]]:
    """(p50 ms of model.run on tokens[0], the next_token answer for each of ``tokens``)."""
    import modrt

    model = modrt.load(bundle, provider="cpu")
    for _ in range(10):
        model.run(tokens=tokens[0])
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        model.run(tokens=tokens[0])
        lat.append(time.perf_counter() - t0)
    return pct(lat, 50) * 1e3, [model.run(tokens=t)["next_token"] for t in tokens]


@click.command()
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), default=None,
              help="A recurrent bundle [default: a random LM, vocab 1000, hidden 64, M=5, K=1].")
@click.option("--seq", default=16, show_default=True, help="Tokens per request (batch 1).")
@click.option("--requests", default=2000, show_default=True, help="Requests per concurrency level (bounded).")
@click.option("--seconds", default=15.0, show_default=True, help="Time cap per concurrency level.")
@click.option("--concurrency", default="1,8,32", show_default=True)
@click.option("--max-batch", default=32, show_default=True, help="The batching server's max batch.")
@click.option("--delay-us", default=2000, show_default=True, help="The batching server's max queue delay.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
def main(bundle, seq, requests, seconds, concurrency, max_batch, delay_us, json_out) -> None:
    tmp = tempfile.TemporaryDirectory()
    if bundle is None:
        from modrt import synthetic_lm

        bundle = synthetic_lm.build(Path(tmp.name) / "lm", vocab=1000, modules=5, k=1, embedding=32, hidden=64)
    bundle = Path(bundle)
    vocab = json.loads((bundle / "manifest.json").read_text())["task"].get("vocab")
    V = len(vocab) if vocab else 2
    rng = np.random.default_rng(0)
    tokens = [rng.integers(0, V, (1, seq), dtype=np.int64) for _ in range(8)]  # 8 different requests
    path = "/v2/models/m/infer"
    levels = [int(c) for c in concurrency.split(",")]
    inproc, answers = in_process(bundle, tokens)
    cases = [(request_bytes(path, t), a) for t, a in zip(tokens, answers, strict=True)]
    report = {"bundle": str(bundle), "seq": seq, "in_process_p50_ms": inproc, "runs": [],
              "loadavg_before": os.getloadavg()}
    click.echo(f"in-process model.run, batch 1 x {seq} tokens: p50 {inproc:.3f} ms; "
               f"load average {report['loadavg_before'][0]:.2f}")
    for label, mb, d in (("batching", max_batch, delay_us), ("max-batch-1", 1, 0)):
        p, port = start_server(bundle, "m", mb, d)
        try:
            load(port, path, cases, 4, 40, 10)  # warm-up
            for c in levels:
                r = load(port, path, cases, c, requests, seconds, p.pid)
                r["server"] = label
                report["runs"].append(r)
                click.echo(f"{label:>12}  c={c:<3} n={r['requests']:<5} errors={r['errors']}  "
                           f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  {r['infer_per_s']:7.1f} infer/s  "
                           f"cpu client {r['client_cpu_pct']:4.0f}% server {r['server_cpu_pct']:4.0f}%")
                for e in r["error_sample"]:
                    click.echo(f"              {e}")
        finally:
            p.terminate()
            p.wait(30)
    by = {(r["server"], r["concurrency"]): r for r in report["runs"]}
    top = max(levels)
    if ("batching", top) in by and ("max-batch-1", top) in by:
        gain = by[("batching", top)]["infer_per_s"] / by[("max-batch-1", top)]["infer_per_s"]
        report["batching_gain_at_max_concurrency"] = gain
        click.echo(f"dynamic batching / max batch 1 throughput at concurrency {top}: {gain:.2f}x")
    if ("max-batch-1", 1) in by:
        over = by[("max-batch-1", 1)]["p50_ms"] - inproc
        report["http_overhead_p50_ms"] = over
        click.echo(f"HTTP overhead at batch 1 (p50, max-batch-1 server, c=1, minus in-process): {over:.3f} ms")
    report["loadavg_after"] = os.getloadavg()
    click.echo(f"load average after: {report['loadavg_after'][0]:.2f} (2 cores, shared with other work)")
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
