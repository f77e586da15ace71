"""The infer routes on the bare ASGI interface: the hot path, without FastAPI's machinery.

``POST /v2/models/{name}/infer`` and ``.../versions/{version}/infer`` are answered here;
every other request goes on to the FastAPI app (which also documents the infer routes in
its OpenAPI document). Profiled at concurrency 32, FastAPI's routing, request object,
dependency solving and response classes cost about a third of the event loop's time per
request; this path reads the body, calls the data plane, and sends the bytes it returns.

Statuses are those of ``app.py``: 400 bad request, 404 unknown model, 413 body over the
limit, 503 not ready or stopping, 500 anything else (logged; the server stays up).
"""

from __future__ import annotations

import logging
import re

import orjson

from modrt._exceptions import InputError, ModrtError
from modrt.serve import binary
from modrt.serve.dataplane import DataPlane, ModelNotFoundError, NotReadyError, PayloadTooLargeError

log = logging.getLogger("modrt.serve")

STATUS: dict[type[Exception], int] = {
    InputError: 400, ModelNotFoundError: 404, PayloadTooLargeError: 413, NotReadyError: 503,
}
INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
_BINARY_HEADER = binary.HEADER.lower().encode("latin-1")


def status_of(exc: Exception) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


class ClientGone(Exception):
    """The client disconnected before its body was read: nobody to answer."""


class InferRoute:
    """ASGI middleware: answers the infer routes itself, passes everything else to ``app``."""

    def __init__(self, app, plane: DataPlane, max_request_bytes: int):
        self.app = app
        self.plane = plane
        self.limit = max_request_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        m = INFER_PATH.fullmatch(scope["path"])
        if m is None:
            return await self.app(scope, receive, send)
        name, version = m.groups()
        plane = self.plane
        headers: list[tuple[bytes, bytes]]
        try:
            declared = header_length = None
            for k, v in scope["headers"]:
                if k == b"content-length":
                    declared = v
                elif k == _BINARY_HEADER:
                    header_length = v.decode("latin-1")
            plane.check_model(name, version)
            body = await self._body(receive, declared)
            content, extra = await plane.infer(name, body, header_length, version)
            status = 200
            headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
        except ClientGone:
            return
        except ModrtError as exc:
            status, content, headers = self._error(status_of(exc), str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug answers 500 and the server goes on
            log.exception("internal error on POST %s", scope["path"])
            status, content, headers = self._error(500, f"internal error: {type(exc).__name__}: {exc}")
        headers.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    def _error(self, status: int, message: str) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        self.plane.metrics.observe_failure(status)
        return status, orjson.dumps({"error": message}), [(b"content-type", b"application/json")]

    async def _body(self, receive, declared: bytes | None) -> bytes:
        """The body, refused with 413 as soon as it is known to exceed the limit."""
        limit = self.limit
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLargeError(f"request body of {declared.decode()} bytes exceeds the limit of "
                                       f"{limit} bytes")
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise ClientGone
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


__all__ = ["INFER_PATH", "InferRoute", "STATUS", "status_of"]
