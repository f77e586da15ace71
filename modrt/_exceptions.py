"""modrt's one exception tree.

    ModrtError                 anything modrt reports to a user as one line
    ├── DataError              a data set is missing, corrupt or unreadable
    ├── CheckpointError        not a modrt checkpoint, wrong version, config cannot continue
    ├── BundleError            a bundle that fails validation (file, checksum, schema, shape)
    ├── ExportError            a checkpoint that cannot be exported, parity out of tolerance
    ├── InputError             a request or argument the model cannot take
    ├── TrainingError          training diverged (non-finite values); the last checkpoint is kept
    ├── ProviderError          an execution provider that is unknown or unavailable
    │   (modrt.serve.errors: the ones only the server raises)
    ├── ModelNotFoundError     a model or version the server does not serve (404)
    ├── PayloadTooLargeError   a request body over the server's limit (413)
    └── NotReadyError          the server is starting or draining (503)
        └── BatcherClosedError the batcher stopped under a request (shutdown)

Lower libraries' errors (torch, onnx, onnxruntime, OS) are converted at the boundary:
``raise DataError(f"...: {exc}") from exc``; onnxruntime's in one place,
``modrt.runtime.errors`` (running a graph -> InputError or ModrtError, loading one ->
BundleError). The CLI catches ``ModrtError`` and prints one line; the server maps each
class to a status code (``modrt.serve.errors.STATUS``).
"""

from __future__ import annotations


class ModrtError(Exception):
    """Base of every error modrt reports to its user."""


class DataError(ModrtError):
    """A data set is missing, corrupt or cannot be read."""


class CheckpointError(ModrtError):
    """A checkpoint is not modrt's, of another format version, or cannot continue."""


class BundleError(ModrtError):
    """A bundle directory fails validation."""


class ExportError(ModrtError):
    """A checkpoint cannot be exported faithfully."""


class InputError(ModrtError):
    """An input (request, tensor, argument) the model cannot take."""


class TrainingError(ModrtError):
    """Training produced non-finite values; nothing was saved after the last good checkpoint."""


class ProviderError(ModrtError):
    """An ONNX Runtime execution provider that is unknown or not available."""
