"""A fuzz of request sizes against a real ``modrt serve``: its memory stays bounded.

A ``modrt serve`` subprocess on 127.0.0.1 (default limits unless told), a PTB-sized random
LM by default (vocab 10,000, E 128, H 256, M 5, K 1). A bounded loop of requests whose
sizes are drawn log-uniformly from 1 to 30,000 tokens and 1 to 64 rows, each asking for a
random subset of the outputs (or all), as JSON or binary, some with a start state ``h``.
Every answer must be the one the limits predict (200; 413 over ``--max-tokens``; 400 for
an answer over ``--max-response-bytes``), never a 5xx, and the server's resident memory,
read after every request, must stay under ``--rss-bound`` MB. First the three requests a
user reported (``[1, 20000]`` for ``next_token``, ``[1, 2000]`` for everything, and the
largest allowed, ``[1, max_tokens]`` for ``next_token``) are timed.

    python benchmarks/serve_size_fuzz.py                     # 300 requests
    python benchmarks/serve_size_fuzz.py --requests 1000 --json fuzz.json
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

import click
import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import start_server  # noqa: E402

PATH = "/v2/models/m/infer"
OUTPUTS = ("logits", "next_token", "modules", "h_last")


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def body(tokens: np.ndarray, outputs: list[str] | None, binary: bool, h: np.ndarray | None = None
         ) -> tuple[bytes, dict[str, str]]:
    from modrt.serve.binary import HEADER

    inputs = [("tokens", "INT64", tokens)] + ([("h", "FP32", h)] if h is not None else [])
    doc: dict = {"inputs": []}
    tail = []
    for name, dt, x in inputs:
        d = {"name": name, "datatype": dt, "shape": list(x.shape)}
        if binary:
            d["parameters"] = {"binary_data_size": x.nbytes}
            tail.append(x.tobytes())
        else:
            d["data"] = x.ravel().tolist()
        doc["inputs"].append(d)
    if outputs is not None:
        doc["outputs"] = [{"name": n, "parameters": {"binary_data": binary}} for n in outputs]
    else:
        doc["parameters"] = {"binary_data_output": binary}
    head = json.dumps(doc).encode()
    if not binary:
        return head, {"content-type": "application/json"}
    return head + b"".join(tail), {HEADER: str(len(head)), "content-type": "application/octet-stream"}


def expected(B: int, T: int, outputs: list[str] | None, binary: bool, V: int, L: int, H: int,
             max_tokens: int, max_response_bytes: int) -> int:
    """The status the limits predict (the server estimates the answer as this does)."""
    from modrt.serve.binary import JSON_BYTES

    if B * T > max_tokens:
        return 413
    shapes = {"logits": ((B, T, V), "float32"), "next_token": ((B, T), "int64"), "modules": ((B, T, L, 1), "int32"),
              "h_last": ((B, L, H), "float32")}
    size = 0
    for n in outputs or OUTPUTS:
        shape, dt = shapes[n]
        size += math.prod(shape) * (np.dtype(dt).itemsize if binary else JSON_BYTES[dt])
    return 400 if size > max_response_bytes else 200


def fuzz(bundle: Path, requests: int = 300, seed: int = 0, max_tokens: int = 8192,
         max_response_bytes: int = 64 * 2**20, rss_bound_mb: float = 800.0, max_t: int = 30_000) -> dict:
    manifest = json.loads((bundle / "manifest.json").read_text())
    V = len(manifest["task"]["vocab"])
    import modrt

    model = modrt.load(bundle, provider="cpu")
    L, H = len(model.manifest.layers), model.zero_state(1).shape[1]
    p, port = start_server(bundle, "m", 8, 1000, ["--max-tokens", str(max_tokens),
                                                   "--max-response-bytes", str(max_response_bytes)])
    rng = np.random.default_rng(seed)
    statuses: dict[int, int] = {}
    wrong: list[str] = []
    rss = [rss_mb(p.pid)]
    named: dict[str, dict] = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as c:
            def send(tok, outputs, binary, h=None):
                content, headers = body(tok, outputs, binary, h)
                t0 = time.perf_counter()
                r = c.post(PATH, content=content, headers=headers)
                return r, time.perf_counter() - t0

            for label, (tok, outs) in {
                f"[1, {2 * max_tokens + 3616}] next_token": (np.ones((1, 2 * max_tokens + 3616), np.int64),
                                                             ["next_token"]),
                "[1, 2000] every output as JSON": (np.ones((1, 2000), np.int64), None),
                f"[1, {max_tokens}] next_token": (np.ones((1, max_tokens), np.int64), ["next_token"]),
            }.items():
                r, dt = send(tok, outs, False)
                rss.append(rss_mb(p.pid))
                named[label] = {"status": r.status_code, "seconds": round(dt, 3), "bytes": len(r.content),
                                "rss_mb": round(rss[-1], 1),
                                "error": r.json().get("error") if r.status_code != 200 else None}
            rss_start = rss[-1]
            t_start = time.perf_counter()
            for _ in range(requests):
                B = int(rng.choice([1, 1, 2, 4, 16, 64]))
                T = max(1, int(math.exp(rng.uniform(0, math.log(max_t)))))
                outputs = None if rng.random() < 0.25 else sorted(
                    rng.choice(OUTPUTS, size=int(rng.integers(1, 5)), replace=False).tolist())
                binary = bool(rng.random() < 0.5)
                h = rng.standard_normal((B, L, H)).astype(np.float32) if rng.random() < 0.2 else None
                tok = rng.integers(0, V, (B, T), dtype=np.int64)
                r, _ = send(tok, outputs, binary, h)
                want = expected(B, T, outputs, binary, V, L, H, max_tokens, max_response_bytes)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code != want:
                    wrong.append(f"[{B}, {T}] {outputs} binary={binary}: {r.status_code}, expected {want}: "
                                 f"{r.text[:200]}")
                rss.append(rss_mb(p.pid))
            seconds = time.perf_counter() - t_start
        alive = p.poll() is None
    finally:
        p.terminate()
        code = p.wait(30)
    return {"requests": requests, "statuses": statuses, "wrong": wrong[:10], "wrong_count": len(wrong),
            "named": named, "rss_start_mb": round(rss[0], 1), "rss_after_named_mb": round(rss_start, 1),
            "rss_max_mb": round(max(rss), 1), "rss_end_mb": round(rss[-1], 1), "rss_bound_mb": rss_bound_mb,
            "within_bound": max(rss) < rss_bound_mb, "seconds": round(seconds, 1), "server_alive": alive,
            "server_exit_code": code, "max_tokens": max_tokens, "max_response_bytes": max_response_bytes}


@click.command()
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), default=None,
              help="A recurrent bundle [default: a random PTB-sized LM: vocab 10,000, E 128, H 256, M 5, K 1].")
@click.option("--requests", default=300, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True)
@click.option("--max-tokens", default=8192, show_default=True, help="The server's --max-tokens.")
@click.option("--max-response-bytes", default=64 * 2**20, show_default=True, help="The server's --max-response-bytes.")
@click.option("--rss-bound", default=800.0, show_default=True, help="Server RSS (MB) that fails the fuzz.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
def main(bundle, requests, seed, max_tokens, max_response_bytes, rss_bound, json_out) -> None:
    tmp = tempfile.TemporaryDirectory()
    if bundle is None:
        from modrt import synthetic_lm

        bundle = synthetic_lm.build(Path(tmp.name) / "lm", vocab=10_000, modules=5, k=1, embedding=128, hidden=256)
    r = fuzz(Path(bundle), requests, seed, max_tokens, max_response_bytes, rss_bound)
    click.echo(json.dumps(r, indent=1))
    if json_out:
        Path(json_out).write_text(json.dumps(r, indent=1))
    ok = r["within_bound"] and r["wrong_count"] == 0 and r["server_alive"] and not any(s >= 500 for s in r["statuses"])
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
