"""benchmarks/serve_size_fuzz.py, scaled down: request sizes drawn at random against a real
``modrt serve`` get the status the limits predict, never a 5xx, and the server's memory
stays bounded (the full fuzz: ``python benchmarks/serve_size_fuzz.py``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("psutil")
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_size_fuzz.py"


def test_a_fuzz_of_sizes_keeps_the_server_bounded(tmp_path):
    from modrt import synthetic_lm

    spec = importlib.util.spec_from_file_location("serve_size_fuzz", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    bundle = synthetic_lm.build(tmp_path / "lm", vocab=2000, modules=4, k=1, embedding=32, hidden=64)
    r = mod.fuzz(bundle, requests=40, max_tokens=2000, max_response_bytes=8 * 2**20, rss_bound_mb=400, max_t=5000)
    assert r["wrong_count"] == 0, r["wrong"]
    assert r["server_alive"] and r["server_exit_code"] == 0
    assert set(r["statuses"]) <= {200, 400, 413} and r["statuses"].get(200, 0) >= 5, r["statuses"]
    assert r["named"]["[1, 7616] next_token"]["status"] == 413
    assert r["named"]["[1, 2000] every output as JSON"]["status"] == 400
    assert r["named"]["[1, 2000] next_token"]["status"] == 200
    assert r["within_bound"], r
