"""Torch setup for the training tests."""

from __future__ import annotations

import pytest

torch = pytest.importorskip(
    "torch", reason="the training tests need PyTorch (pip install 'modrt[train]')"
)

# Tiny models: one thread avoids the oversubscription that makes small ops crawl when
# another process (or pytest-xdist worker) shares the cores.
torch.set_num_threads(1)
