"""onnxruntime's errors turned into modrt's (``_exceptions.py``), once, where modrt calls it.

Two boundaries, one table each:

- **running** a session (``running(where)``, or ``convert(where, exc)`` on the per-call hot
  paths): onnxruntime's ``InvalidArgument`` / ``InvalidGraph`` and its Python wrapper's
  ``ValueError`` (missing or unknown feed names) are the caller's input -> ``InputError``
  (400 in the server); anything else it raises -> ``ModrtError`` naming the graph and
  the error's type (500). A ``ModrtError`` passes through unchanged.
- **loading** a graph (``loading(what)``): -> ``BundleError`` ("onnxruntime cannot load
  it"), except the process-wide thread-pool conflict -> ``ProviderError``.

The body of either must be the onnxruntime call alone, so that what it converts is
onnxruntime's and a bug of modrt's own is never relabelled. The two hottest calls (a
graph's ``run`` and a composed layer's) write ``try/except Exception: raise convert(...)``
inline instead of the ``with`` block: the same conversion, without the context manager's
~170 ns a call (measured; a small layer's call is ~20 µs).
"""

from __future__ import annotations

from modrt._exceptions import BundleError, InputError, ModrtError, ProviderError

# onnxruntime's exception classes (pybind11) for errors in what it was given.
INPUT_KINDS = frozenset({"InvalidArgument", "InvalidGraph"})


def _one_line(exc: BaseException, limit: int = 300) -> str:
    return " ".join(str(exc).split())[:limit]


def convert(where: str, exc: Exception) -> ModrtError:
    """The modrt error for ``exc``, raised by onnxruntime running ``where`` (a graph or a layer)."""
    if isinstance(exc, ModrtError):
        return exc
    kind = type(exc).__name__
    if kind in INPUT_KINDS or type(exc) is ValueError:
        return InputError(f"{where}: {_one_line(exc)}")
    return ModrtError(f"{where} failed ({kind}): {_one_line(exc)}")


def convert_load(what: str, exc: Exception) -> ModrtError:
    """The modrt error for ``exc``, raised by onnxruntime creating a session on ``what``."""
    if isinstance(exc, ModrtError):
        return exc
    if "global thread pool" in " ".join(str(exc).split()):
        return ProviderError("this process already uses ONNX Runtime's global thread pool; "
                             "load every bundle with thread_pool='global'")
    return BundleError(f"{what}: onnxruntime cannot load it ({_one_line(exc)})")


class _Boundary:
    __slots__ = ("what", "_convert")

    def __init__(self, what: str, conv):
        self.what = what
        self._convert = conv

    def __enter__(self) -> _Boundary:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or not isinstance(exc, Exception) or isinstance(exc, ModrtError):
            return False  # KeyboardInterrupt and modrt's own errors go through as they are
        raise self._convert(self.what, exc) from exc


def running(where: str) -> _Boundary:
    """``with running("graph 'x'"): session.run(...)``: errors converted by ``convert``."""
    return _Boundary(where, convert)


def loading(what: str) -> _Boundary:
    """``with loading(path): ort.InferenceSession(...)``: errors converted by ``convert_load``."""
    return _Boundary(what, convert_load)


__all__ = ["convert", "convert_load", "running", "loading"]
