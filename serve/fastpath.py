"""The infer routes on the bare ASGI interface: the hot path, without FastAPI's machinery.

``POST /v2/models/{name}/infer`` and ``.../versions/{version}/infer`` are answered here;
every other request goes on to the FastAPI app (which also documents the infer routes in
its OpenAPI document). Profiled at concurrency 32, FastAPI's routing, request object,
dependency solving and response classes cost about a third of the event loop's time per
request; this path reads the body, calls the data plane, and sends the bytes it returns.

Errors are answered by ``errors.answer``, as the app's handlers answer them (statuses:
``errors.py``).
"""

from __future__ import annotations

import re

from modrt.serve import binary, errors
from modrt.serve.dataplane import DataPlane
from modrt.serve.errors import PayloadTooLargeError

INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
_BINARY_HEADER = binary.HEADER.lower().encode("latin-1")


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
        except Exception as exc:  # noqa: BLE001 - answered (a bug: 500, logged) and the server goes on
            status, content = errors.answer(exc, f"POST {scope['path']}")
            plane.metrics.observe_failure(status)
            headers = [(b"content-type", b"application/json")]
        headers.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

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


__all__ = ["INFER_PATH", "InferRoute"]
