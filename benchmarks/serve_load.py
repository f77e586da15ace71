"""Load test of ``modrt serve``: dynamic batching vs max batch 1, over loopback HTTP.

For each server setting a real ``modrt serve`` subprocess is started on 127.0.0.1 (a free
port); a bounded number of requests (binary tensor data, one sequence each) is sent at
concurrency 1, 8 and 32 over keep-alive HTTP/1.1 connections (a minimal asyncio client,
so the load generator costs little CPU); p50/p99 latency and throughput are reported,
and, at batch 1, the HTTP overhead over calling the runtime in-process.

    python benchmarks/serve_load.py                      # random PTB-sized-ish LM bundle
    python benchmarks/serve_load.py --bundle out/ --requests 400 --json load.json
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

HEADER = "Inference-Header-Content-Length"


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def body_for(tokens: np.ndarray) -> bytes:
    head = json.dumps({"inputs": [{"name": "tokens", "datatype": "INT64", "shape": list(tokens.shape),
                                   "parameters": {"binary_data_size": tokens.nbytes}}],
                       "outputs": [{"name": "next_token", "parameters": {"binary_data": True}}]}).encode()
    return head + tokens.astype("<i8").tobytes(), len(head)


async def one_connection(port: int, path: str, payload: bytes, hlen: int, n: int, lat: list, errors: list,
                         deadline: float) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    req = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
           f"{HEADER}: {hlen}\r\nContent-Length: {len(payload)}\r\n\r\n").encode() + payload
    try:
        for _ in range(n):
            if time.perf_counter() > deadline:
                break
            t0 = time.perf_counter()
            writer.write(req)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
            if status != 200:
                errors.append(status)
    finally:
        writer.close()


async def load(port: int, path: str, payload: bytes, hlen: int, concurrency: int, requests: int,
               seconds: float) -> dict:
    lat: list[float] = []
    errors: list[int] = []
    per = -(-requests // concurrency)
    t0 = time.perf_counter()
    await asyncio.gather(*(one_connection(port, path, payload, hlen, per, lat, errors, t0 + seconds)
                           for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": len(lat), "errors": len(errors),
            "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3, "infer_per_s": len(lat) / wall}


def start_server(bundle: Path, name: str, max_batch: int, delay_us: int) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen([sys.executable, "-m", "modrt", "serve", str(bundle), "--port", "0", "--host", "127.0.0.1",
                          "--model-name", name, "--max-batch", str(max_batch), "--max-queue-delay-us", str(delay_us),
                          "--provider", "cpu"], stderr=subprocess.PIPE, text=True)
    m = re.search(r"http://127\.0\.0\.1:(\d+)", p.stderr.readline())
    if not m:
        p.kill()
        raise SystemExit(f"server did not start: {p.stderr.read()}")
    return p, int(m.group(1))


def in_process_p50(bundle: Path, tokens: np.ndarray, n: int = 200) -> float:
    import modrt

    model = modrt.load(bundle, provider="cpu")
    for _ in range(10):
        model.run(tokens=tokens)
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        model.run(tokens=tokens)
        lat.append(time.perf_counter() - t0)
    return pct(lat, 50) * 1e3


@click.command()
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), default=None,
              help="A recurrent bundle [default: a random LM, vocab 1000, hidden 64, M=5, K=1].")
@click.option("--seq", default=16, show_default=True, help="Tokens per request (batch 1).")
@click.option("--requests", default=300, show_default=True, help="Requests per concurrency level (bounded).")
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
    tokens = np.random.default_rng(0).integers(0, V, (1, seq), dtype=np.int64)
    payload, hlen = body_for(tokens)
    levels = [int(c) for c in concurrency.split(",")]
    inproc = in_process_p50(bundle, tokens)
    report = {"bundle": str(bundle), "seq": seq, "in_process_p50_ms": inproc, "runs": []}
    click.echo(f"in-process model.run, batch 1 x {seq} tokens: p50 {inproc:.3f} ms")
    for label, mb, d in (("batching", max_batch, delay_us), ("max-batch-1", 1, 0)):
        p, port = start_server(bundle, "m", mb, d)
        try:
            asyncio.run(load(port, "/v2/models/m/infer", payload, hlen, 4, 40, 10))  # warm-up
            for c in levels:
                r = asyncio.run(load(port, "/v2/models/m/infer", payload, hlen, c, requests, seconds))
                r["server"] = label
                report["runs"].append(r)
                click.echo(f"{label:>12}  c={c:<3} n={r['requests']:<5} errors={r['errors']}  "
                           f"p50 {r['p50_ms']:8.2f} ms  p99 {r['p99_ms']:8.2f} ms  {r['infer_per_s']:8.1f} infer/s")
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
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
