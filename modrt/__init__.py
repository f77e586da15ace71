"""modrt: modular networks trained with EM, exported per module, served routed.

The core package is torch-free (numpy + onnxruntime); training lives in
``modrt.train`` and needs the ``train`` extra.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from modrt._exceptions import (
    BundleError,
    CheckpointError,
    DataError,
    ExportError,
    InputError,
    ModrtError,
    ProviderError,
    TrainingError,
)
from modrt._version import __version__

if TYPE_CHECKING:
    from modrt.runtime.model import Model


def load(
    path: str | os.PathLike, provider: str = "auto", strategy: str = "auto", **kwargs: Any
) -> Model:
    """Load a bundle for routed inference; see ``modrt.runtime.model.load``.

    The runtime (numpy + onnxruntime) is imported here, on first use, so that
    ``import modrt`` stays light.
    """
    from modrt.runtime import load as _load

    return _load(path, provider=provider, strategy=strategy, **kwargs)


__all__ = [
    "BundleError",
    "CheckpointError",
    "DataError",
    "ExportError",
    "InputError",
    "ModrtError",
    "ProviderError",
    "TrainingError",
    "__version__",
    "load",
]
