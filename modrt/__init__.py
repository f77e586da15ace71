"""modrt: modular networks trained with EM, exported per module, served routed.

The core package is torch-free (numpy + onnxruntime); training lives in
``modrt.train`` and needs the ``train`` extra.
"""

from modrt._exceptions import (
    BundleError,
    CheckpointError,
    DataError,
    ExportError,
    InputError,
    ModrtError,
    ProviderError,
)
from modrt._version import __version__

__all__ = [
    "BundleError",
    "CheckpointError",
    "DataError",
    "ExportError",
    "InputError",
    "ModrtError",
    "ProviderError",
    "__version__",
]
