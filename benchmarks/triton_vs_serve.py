"""Triton (the repository ``modrt export-triton`` writes) beside ``modrt serve``, one run,
same bundle, same client.

Both servers speak the KServe v2 protocol, so one client (``tritonclient.http``, binary
tensors) calls both. For each bundle: the repository is written with ``--onnx-backend
python`` (the ``nvidia-pytriton`` wheel's tritonserver has only the Python backend, so each
ONNX graph is a Python model running ONNX Runtime; a Triton with the onnxruntime backend
serves the same configs natively), a real ``tritonserver`` and a real ``modrt serve`` are
started on 127.0.0.1, and:

- equality: the routed outputs of Triton, of ``modrt serve`` and of modrt's runtime in this
  process on the same inputs (max |logit diff|, routing equal);
- latency: sequential requests at batch 1 and 8, p50 / p99;
- throughput: ``--clients`` threads, each with its own connection, rows/s.

For a recurrent bundle Triton runs twice: the recurrent layer inside the router
(``--recurrent local``) and one BLS round per time step (``--recurrent bls``).

    python benchmarks/triton_vs_serve.py --bundle out/ [--bundle out2/] \\
        --triton-python .triton-venv/bin/python --markdown results/triton_vs_serve.md
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import click
import numpy as np

import modrt
from modrt.triton import Options, write
from modrt.triton.server import TritonServer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ModrtServe:
    def __init__(self, bundle: Path, threads: int):
        self.port = _free_port()
        self.cmd = [sys.executable, "-m", "modrt", "serve", str(bundle), "--port", str(self.port),
                    "--provider", "cpu", "--strategy", "host", "--log-level", "warning"]
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads)}

    def __enter__(self):
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/health/ready", timeout=1):
                    return self
            except OSError:
                time.sleep(0.25)
        raise RuntimeError("modrt serve did not become ready")

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _inputs(model, batch: int, rng) -> dict[str, np.ndarray]:
    t = model.signature.input
    if model.topology == "recurrent":
        return {"tokens": rng.integers(0, t.bounds[1], (batch, 35)).astype(np.int64)}
    return {t.name: rng.standard_normal((batch, *t.shape[1:])).astype(np.float32)}


def _call(client, name: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
    import tritonclient.http as th

    ins = []
    for n, v in feeds.items():
        i = th.InferInput(n, list(v.shape), "INT64" if v.dtype == np.int64 else "FP32")
        i.set_data_from_numpy(v, binary_data=True)
        ins.append(i)
    outs = [th.InferRequestedOutput(o, binary_data=True) for o in outputs]
    r = client.infer(name, ins, outputs=outs)
    return {o: r.as_numpy(o) for o in outputs}


def _measure(url: str, name: str, model, outputs: list[str], batches: list[int], requests: int,
             clients: int, seed: int) -> dict:
    import tritonclient.http as th

    rng = np.random.default_rng(seed)
    res = {}
    c = th.InferenceServerClient(url)
    for b in batches:
        feeds = _inputs(model, b, rng)
        for _ in range(10):
            _call(c, name, feeds, outputs)
        lat = []
        for _ in range(requests):
            t0 = time.perf_counter()
            _call(c, name, feeds, outputs)
            lat.append(time.perf_counter() - t0)
        res[f"p50_ms_b{b}"] = 1e3 * float(np.percentile(lat, 50))
        res[f"p99_ms_b{b}"] = 1e3 * float(np.percentile(lat, 99))
    # throughput at batch 1: concurrent clients, each its own connection
    feeds = _inputs(model, 1, rng)
    per = max(1, requests // clients)

    def worker():
        cl = th.InferenceServerClient(url)
        for _ in range(per):
            _call(cl, name, feeds, outputs)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res["rows_per_s_b1"] = per * clients / (time.perf_counter() - t0)
    return res


@click.command()
@click.option("--bundle", "bundles", multiple=True, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--triton-python", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The interpreter of a venv with nvidia-pytriton, numpy<2 and onnxruntime.")
@click.option("--requests", default=100, show_default=True, type=int)
@click.option("--clients", default=8, show_default=True, type=int)
@click.option("--batches", default="1,8", show_default=True)
@click.option("--threads", default=1, show_default=True, type=int, help="ORT threads per model / server.")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False))
@click.option("--markdown", default=None, type=click.Path(dir_okay=False))
def main(bundles, triton_python, requests, clients, batches, threads, json_out, markdown):
    batches = [int(b) for b in batches.split(",")]
    rows = []
    for bdir in map(Path, bundles):
        model = modrt.load(bdir, provider="cpu", strategy="host", threads=threads)
        name = str(model.manifest.task.get("name"))
        outputs = [t.name for t in model.signature.outputs if t.name != "h_last"]
        probe = _inputs(model, 4, np.random.default_rng(123))
        ref = model.run(**probe)
        modes = ["local", "bls"] if model.topology == "recurrent" else ["bls"]
        with tempfile.TemporaryDirectory() as tmp:
            runs = []
            with ModrtServe(bdir, threads) as srv:
                runs.append(("modrt serve", srv.url))
                import tritonclient.http as th

                got = _call(th.InferenceServerClient(srv.url), name, probe, outputs)
                rows.append(_row(bdir, "modrt serve", "-", got, ref, outputs,
                                 _measure(srv.url, name, model, outputs, batches, requests, clients, 0)))
            for mode in modes:
                repo = Path(tmp) / f"repo-{mode}"
                write(bdir, repo, Options(onnx_backend="python", recurrent=mode, threads=threads))
                with TritonServer(repo, python=triton_python, log=Path(tmp) / f"triton-{mode}.log") as tsrv:
                    got = _call(th.InferenceServerClient(tsrv.http_url), name, probe, outputs)
                    rows.append(_row(bdir, "triton", mode, got, ref, outputs,
                                     _measure(tsrv.http_url, name, model, outputs, batches, requests, clients, 0)))
            print(json.dumps(rows[-len(modes) - 1:], indent=1), flush=True)
    if json_out:
        Path(json_out).write_text(json.dumps(rows, indent=1))
    if markdown:
        Path(markdown).write_text(_markdown(rows, batches, requests, clients, threads))


def _row(bdir: Path, server: str, mode: str, got: dict, ref: dict, outputs: list[str], timing: dict) -> dict:
    key = outputs[0]
    return {"bundle": bdir.name, "server": server, "recurrent": mode,
            "max_abs_diff": float(np.abs(got[key] - ref[key]).max()),
            "routing_equal": bool(np.array_equal(got["modules"], ref["modules"])), **timing}


def _markdown(rows, batches, requests, clients, threads) -> str:
    head = ["bundle", "server", "recurrent layer", "max abs diff vs runtime", "routing equal",
            *[f"p50 ms b{b}" for b in batches], *[f"p99 ms b{b}" for b in batches], f"rows/s b1 ({clients} clients)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["bundle"], r["server"], r["recurrent"], f"{r['max_abs_diff']:.2g}", str(r["routing_equal"]),
                 *[f"{r[f'p50_ms_b{b}']:.2f}" for b in batches], *[f"{r[f'p99_ms_b{b}']:.2f}" for b in batches],
                 f"{r['rows_per_s_b1']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return ("# Triton vs modrt serve, one run\n\n"
            f"`python benchmarks/triton_vs_serve.py` ({requests} sequential requests per batch size after 10 "
            f"warm-up; throughput: {clients} client threads at batch 1; {threads} ORT thread(s) per model; "
            "one client, tritonclient.http with binary tensors, for both servers; 127.0.0.1). Triton is the "
            "nvidia-pytriton wheel's server, its ONNX graphs served by Python-backend models running ONNX "
            "Runtime (that build has no onnxruntime backend), so every hop pays a Python stub.\n\n"
            + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
