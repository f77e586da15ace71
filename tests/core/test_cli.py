"""The torch-free commands' argument errors: one line, the right exit code."""

from __future__ import annotations

import subprocess
import sys


def _modrt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modrt", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_command():
    p = _modrt("--help")
    assert p.returncode == 0
    for cmd in ("train", "export", "eval", "bench"):
        assert f"  {cmd} " in p.stdout


def test_unknown_provider_is_a_usage_error_listing_available_ones():
    for cmd in (["eval", "nowhere"], ["bench", "--synthetic"]):
        p = _modrt(*cmd, "--provider", "warp-drive")
        assert p.returncode == 2, p.stderr
        assert "warp-drive" in p.stderr and "CPUExecutionProvider" in p.stderr
        assert "Traceback" not in p.stderr


def test_missing_bundle_is_one_line(tmp_path):
    for cmd in ("eval", "bench"):
        p = _modrt(cmd, str(tmp_path / "nope"))
        assert p.returncode == 1, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "nope" in lines[0], p.stderr
