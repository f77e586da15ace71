"""Soak test of ``modrt serve``: many requests at high concurrency; no errors, no leak.

A real ``modrt serve`` subprocess on 127.0.0.1 (a free port), dynamic batching on. Mixed
requests (1-2 rows, 4-32 tokens: several batch keys) over ``--concurrency`` keep-alive
connections, each answer checked against the in-process runtime (see serve_load.py).
A warm-up first (allocator pools, ORT arenas, metric children settle), then the server's
resident memory is read, the soak runs (bounded by ``--requests`` and ``--seconds``), and
it is read again. Pass: 0 errors and RSS growth under ``--max-growth`` percent.

    python benchmarks/serve_soak.py                       # 10,000 requests at concurrency 64
    python benchmarks/serve_soak.py --requests 2000 --json soak.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import in_process, load, request_bytes, start_server  # noqa: E402

PATH = "/v2/models/m/infer"


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def soak(bundle: Path, requests: int = 10_000, concurrency: int = 64, warmup: int = 2000, seconds: float = 90.0,
         max_batch: int = 32, delay_us: int = 2000) -> dict:
    vocab = json.loads((bundle / "manifest.json").read_text())["task"].get("vocab")
    V = len(vocab) if vocab else 2
    rng = np.random.default_rng(1)
    tokens = [rng.integers(0, V, (1 + i % 2, (4, 8, 16, 32)[i % 4]), dtype=np.int64) for i in range(16)]
    _, answers = in_process(bundle, tokens, n=1)
    cases = [(request_bytes(PATH, t), a) for t, a in zip(tokens, answers, strict=True)]
    p, port = start_server(bundle, "m", max_batch, delay_us)
    try:
        warm = load(port, PATH, cases, concurrency, warmup, seconds, p.pid)
        rss0 = rss_mb(p.pid)
        t0 = time.perf_counter()
        run = load(port, PATH, cases, concurrency, requests, seconds, p.pid)
        wall = time.perf_counter() - t0
        rss1 = rss_mb(p.pid)
        alive = p.poll() is None
    finally:
        p.terminate()
        code = p.wait(30)
    return {"requests": run["requests"], "concurrency": concurrency, "errors": run["errors"] + warm["errors"],
            "error_sample": run["error_sample"] + warm["error_sample"], "seconds": wall,
            "infer_per_s": run["infer_per_s"], "p50_ms": run["p50_ms"], "p99_ms": run["p99_ms"],
            "client_cpu_pct": run["client_cpu_pct"], "server_cpu_pct": run["server_cpu_pct"],
            "warmup_requests": warm["requests"], "rss_after_warmup_mb": rss0, "rss_after_mb": rss1,
            "rss_growth_pct": 100 * (rss1 - rss0) / rss0, "server_alive": alive, "server_exit_code": code,
            "loadavg": os.getloadavg()}


@click.command()
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), default=None,
              help="A recurrent bundle [default: a random LM, vocab 1000, hidden 64, M=5, K=1].")
@click.option("--requests", default=10_000, show_default=True)
@click.option("--concurrency", default=64, show_default=True)
@click.option("--warmup", default=2000, show_default=True, help="Requests before the first RSS reading.")
@click.option("--seconds", default=90.0, show_default=True, help="Time cap of the soak (and of the warm-up).")
@click.option("--max-growth", default=10.0, show_default=True, help="RSS growth (%) that fails the soak.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
def main(bundle, requests, concurrency, warmup, seconds, max_growth, json_out) -> None:
    tmp = tempfile.TemporaryDirectory()
    if bundle is None:
        from modrt import synthetic_lm

        bundle = synthetic_lm.build(Path(tmp.name) / "lm", vocab=1000, modules=5, k=1, embedding=32, hidden=64)
    r = soak(Path(bundle), requests, concurrency, warmup, seconds)
    click.echo(f"soak: {r['requests']} requests at concurrency {concurrency} in {r['seconds']:.1f} s "
               f"({r['infer_per_s']:.0f} infer/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms), "
               f"errors {r['errors']}")
    click.echo(f"server RSS: {r['rss_after_warmup_mb']:.1f} MB after {r['warmup_requests']} warm-up requests, "
               f"{r['rss_after_mb']:.1f} MB after the soak ({r['rss_growth_pct']:+.2f}%)")
    click.echo(f"cpu: client {r['client_cpu_pct']:.0f}%, server {r['server_cpu_pct']:.0f}%; "
               f"load average {r['loadavg'][0]:.2f} (2 cores, shared); server exit code {r['server_exit_code']}")
    for e in r["error_sample"]:
        click.echo(f"  {e}")
    if json_out:
        Path(json_out).write_text(json.dumps(r, indent=2))
    ok = r["errors"] == 0 and r["rss_growth_pct"] < max_growth and r["requests"] >= requests and r["server_alive"]
    click.echo("PASS" if ok else "FAIL")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
