"""Data sets, torch-free: reading, verifying and locating them (training and eval share it)."""

from __future__ import annotations

from pathlib import Path


def checkout_dir(name: str) -> Path | None:
    """``../shared/data/<name>`` beside a development checkout (where pyproject.toml is)."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file():
        return root.parent / "shared" / "data" / name
    return None
