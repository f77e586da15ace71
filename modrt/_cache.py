"""modrt's one user cache directory: strategy choices, TensorRT engines and timing caches,
downloaded data.

    $MODRT_CACHE                    if set
    $XDG_CACHE_HOME/modrt           else, if that is set
    ~/.cache/modrt                  else

    <cache>/strategy/<key>.json     auto's measured choice per bundle and machine
    <cache>/tensorrt/<bundle>-<sha> TensorRT engines of one bundle's contents
    <cache>/tensorrt/               the TensorRT timing cache (GPU and TensorRT version only)
    <cache>/ptb/                    Penn Treebank, when downloaded
    <cache>/cifar10/                CIFAR-10, when downloaded; decoded/ the JPEG copies' arrays
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MODRT_CACHE"


def cache_dir(*parts: str) -> Path:
    """The cache directory, or ``parts`` under it (not created)."""
    if os.environ.get(CACHE_ENV):
        base = Path(os.environ[CACHE_ENV])
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modrt"
    return base.joinpath(*parts)


__all__ = ["CACHE_ENV", "cache_dir"]
