"""Per-run locks: which process trains a configuration (``modrt reproduce``)."""

from __future__ import annotations

from pathlib import Path
from typing import IO


def claim(out: Path, name: str) -> IO | None:
    """An exclusive lock on configuration ``name`` (held while the returned file is open),
    or None if another process holds it. The operating system drops the lock when its
    holder exits, however it exits. Without ``fcntl`` (not POSIX) every claim succeeds."""
    locks = out / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    f = open(locks / f"{name}.lock", "a")  # noqa: SIM115 - the lock lives as long as the file
    try:
        import fcntl
    except ImportError:
        return f
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


def held(out: Path, name: str) -> bool:
    """Whether another process is training configuration ``name`` now."""
    if not (out / ".locks" / f"{name}.lock").exists():
        return False
    lock = claim(out, name)
    if lock is None:
        return True
    lock.close()
    return False


__all__ = ["claim", "held"]
