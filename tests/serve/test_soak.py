"""A short soak of a real ``modrt serve`` process (benchmarks/serve_soak.py, scaled down):
0 errors, every answer equal to the in-process runtime's, server RSS growth < 10%.
Slow: ``pytest -m slow``; the full soak is ``python benchmarks/serve_soak.py``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("psutil")
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_soak.py"


@pytest.mark.slow
def test_short_soak(tmp_path):
    from modrt import synthetic_lm

    spec = importlib.util.spec_from_file_location("serve_soak", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    bundle = synthetic_lm.build(tmp_path / "lm", vocab=200, modules=4, k=1, embedding=16, hidden=32)
    r = mod.soak(bundle, requests=2000, concurrency=64, warmup=500, seconds=60)
    assert r["errors"] == 0, r["error_sample"]
    assert r["requests"] >= 2000 and r["server_alive"] and r["server_exit_code"] == 0
    assert r["rss_growth_pct"] < 10, r
