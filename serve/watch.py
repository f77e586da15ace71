"""``modrt serve --watch SECONDS``: reload the bundle when its manifest changes on disk.

An export writes the graphs first and ``manifest.json`` last (it holds their sha256s), so
the manifest's (mtime, size) is the signal. Every ``interval`` seconds it is read; once it
has changed and then stayed the same for one more interval (the writer is done), the data
plane loads the bundle (``DataPlane.load``: validated, swapped in without dropping a
request). A bundle that does not load is one log line and the old one keeps serving; the
next change is tried again.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from modrt._exceptions import ModrtError

log = logging.getLogger("modrt.serve")


def stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class Watcher:
    """Polls ``directory/manifest.json``; ``start`` and ``stop`` in the serving loop."""

    def __init__(self, plane, directory: str | os.PathLike, interval: float):
        self.plane, self.path, self.interval = plane, Path(directory) / "manifest.json", interval
        self.task: asyncio.Task | None = None
        self.loads = self.failures = 0

    async def start(self) -> None:
        self.task = asyncio.create_task(self._loop(), name="modrt-watch")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            self.task = None

    async def _loop(self) -> None:
        served = stamp(self.path)  # what the served bundle's manifest looked like
        seen = served
        while True:
            await asyncio.sleep(self.interval)
            now = stamp(self.path)
            if now != seen:  # still being written, or just changed: look again next time
                seen = now
                continue
            if now == served or now is None:
                continue
            served = now
            try:
                version = await self.plane.load(self.plane.name)
                self.loads += 1
                log.warning("modrt serve --watch: %s changed; now serving version %s", self.path, version)
            except ModrtError:  # DataPlane.load logged it; the old bundle serves
                self.failures += 1


__all__ = ["Watcher", "stamp"]
