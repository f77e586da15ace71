"""The deploy side never imports torch (DESIGN.md §1): checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_clean(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_runtime_bench_and_load_do_not_import_torch(ff_bundle, lm_bundle):
    code = f"""
import sys
import numpy as np
import modrt, modrt.runtime, modrt.bench, modrt.routing, modrt.synthetic, modrt.bundle, modrt.peers
m = modrt.load({str(ff_bundle())!r})
m.run(x=np.ones((2, 8), np.float32)); m.run_dense(x=np.ones((2, 8), np.float32))
lm = modrt.load({str(lm_bundle())!r})
lm.run(tokens=np.ones((2, 3), np.int64))
from modrt.bench import BenchConfig, run
run({str(ff_bundle())!r}, BenchConfig(batches=(1,), seconds=0.01, warmup=0, torch=False), progress=False)
bad = sorted(k for k in sys.modules if k == "torch" or k.startswith("torch."))
print("TORCH:" + ",".join(bad))
"""
    out = run_clean(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("TORCH:"), out.stdout


def test_import_modrt_stays_light():
    out = run_clean("import sys, modrt; print(sorted(m for m in ('torch', 'onnxruntime', 'onnx') "
                    "if m in sys.modules))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_bench_help_does_not_import_torch():
    out = run_clean("import sys\nfrom click.testing import CliRunner\nfrom modrt.cli import cli\n"
                    "r = CliRunner().invoke(cli, ['bench', '--help'])\nassert r.exit_code == 0, r.output\n"
                    "print('torch' in sys.modules)")
    if out.returncode != 0:
        pytest.fail(out.stderr)
    assert out.stdout.strip() == "False"
