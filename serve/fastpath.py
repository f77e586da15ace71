"""The infer routes on the bare ASGI interface: the hot path, without FastAPI's machinery.

``POST /v2/models/{name}/infer`` and ``.../versions/{version}/infer`` are answered here;
every other request goes on to the FastAPI app (which also documents the infer routes in
its OpenAPI document). Profiled at concurrency 32, FastAPI's routing, request object,
dependency solving and response classes cost about a third of the event loop's time per
request; this path reads the body, calls the data plane, and sends the bytes it returns.

Errors are answered by ``errors.answer``, as the app's handlers answer them (statuses:
``errors.py``).

Compression (what tritonclient's ``request_compression_algorithm`` and
``response_compression_algorithm`` send): a body with ``Content-Encoding: gzip`` or
``deflate`` (zlib) is decompressed before it is read, bounded by ``--max-request-bytes``
on both sides (a small bomb cannot grow past it: 413); any other encoding is 415. An
answer is compressed when ``Accept-Encoding`` lists gzip or deflate (gzip first), at a fast
level (JSON tensors shrink ~3x). ``Inference-Header-Content-Length`` counts the
uncompressed JSON header, as Triton's does.
"""

from __future__ import annotations

import re
import zlib

from modrt._exceptions import InputError
from modrt.serve import binary, errors
from modrt.serve.dataplane import DataPlane
from modrt.serve.errors import PayloadTooLargeError, UnsupportedEncodingError

INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
_BINARY_HEADER = binary.HEADER.lower().encode("latin-1")
# Content-Encoding -> zlib's wbits: gzip's header and trailer, or the zlib format (HTTP's "deflate")
WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
COMPRESS_LEVEL = 1  # fast: an answer's bytes are mostly numbers; level 6 is ~4x slower for ~10% less


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
            declared = header_length = encoding = accept = None
            for k, v in scope["headers"]:
                if k == b"content-length":
                    declared = v
                elif k == _BINARY_HEADER:
                    header_length = v.decode("latin-1")
                elif k == b"content-encoding":
                    encoding = v.decode("latin-1").strip().lower()
                elif k == b"accept-encoding":
                    accept = v
            plane.check_model(name, version)
            if encoding not in (None, "", "identity") and encoding not in WBITS:
                raise UnsupportedEncodingError(f"Content-Encoding {encoding[:40]!r} is not supported; send the body "
                                               "as is, gzip or deflate")
            body = await self._body(receive, declared)
            if encoding in WBITS:
                body = decompress(body, encoding, self.limit)
            content, extra = await plane.infer(name, body, header_length, version)
            status = 200
            headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
            coding = accept and chosen_encoding(accept)
            if coding:
                content = compress(content, coding)
                headers.append((b"content-encoding", coding.encode()))
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


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip or deflate body, at most ``limit`` bytes once decompressed (else 413);
    a corrupt or truncated stream is 400."""
    d = zlib.decompressobj(WBITS[encoding])
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InputError(f"the {encoding} request body cannot be decompressed: {exc}") from None
    if len(out) > limit:
        raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes once decompressed ({encoding})")
    if not d.eof:
        raise InputError(f"the {encoding} request body is truncated")
    if d.unused_data:
        raise InputError(f"{len(d.unused_data)} bytes after the end of the {encoding} stream")
    return out


def chosen_encoding(accept: bytes) -> str | None:
    """gzip or deflate when the client's Accept-Encoding allows it (q > 0), else None."""
    allowed = set()
    for part in accept.decode("latin-1").lower().split(","):
        coding, _, params = part.strip().partition(";")
        q = params.strip()
        if q.startswith("q="):
            try:
                if float(q[2:]) <= 0:
                    continue
            except ValueError:
                continue
        allowed.add(coding.strip())
    for coding in ("gzip", "deflate"):
        if coding in allowed or "*" in allowed:
            return coding
    return None


def compress(content: bytes, coding: str) -> bytes:
    c = zlib.compressobj(COMPRESS_LEVEL, zlib.DEFLATED, WBITS[coding])
    return c.compress(content) + c.flush()


__all__ = ["INFER_PATH", "InferRoute", "chosen_encoding", "compress", "decompress"]
