"""Serve's errors, the HTTP status of every error, and the handlers that answer them
(the layout of KServe's python server: its ``errors.py``).

Every error the server reports is a ``ModrtError`` (``modrt._exceptions`` draws the tree);
the classes below are the ones only a server raises. ``status_of`` walks an exception's
classes through ``STATUS``, so a subclass answers as its parent does:

    InputError (malformed body, tensors, dtypes, shapes, ids,   400
                an answer over --max-response-bytes)
    └── LoadError (a bundle that did not load; the old serves)  400
    ModelNotFoundError, unknown route                          404
    PayloadTooLargeError (over --max-request-bytes, --max-tokens)  413
    UnsupportedEncodingError (a Content-Encoding not gzip/deflate)  415
    NotReadyError (starting or draining)                       503
    └── BatcherClosedError (the batcher stopped: shutdown)     503
    any other ModrtError (onnxruntime failed on a graph)        500
    anything else (a bug: logged with its traceback)           500; the server stays up

Bodies are JSON ``{"error": "..."}``, the field tritonclient reads.
"""

from __future__ import annotations

import logging

from modrt._exceptions import InputError, ModrtError

log = logging.getLogger("modrt.serve")


class ModelNotFoundError(ModrtError):
    """A model (or version) this server does not serve: 404."""


class NotReadyError(ModrtError):
    """The server is starting or draining: 503."""


class BatcherClosedError(NotReadyError):
    """``submit`` on a batcher that is stopping or stopped: 503."""


class PayloadTooLargeError(ModrtError):
    """A request body over ``--max-request-bytes`` (compressed or not), or more positions
    than ``--max-tokens``: 413."""


class LoadError(InputError):
    """A bundle that does not load on ``POST .../load`` (the old model keeps serving): 400."""


class UnsupportedEncodingError(ModrtError):
    """A request body in a Content-Encoding the server does not decode: 415."""


STATUS: dict[type[Exception], int] = {
    InputError: 400, ModelNotFoundError: 404, PayloadTooLargeError: 413, UnsupportedEncodingError: 415,
    NotReadyError: 503, ModrtError: 500,
}


def status_of(exc: BaseException) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_body(message: str) -> bytes:
    import orjson  # the serve extra; `modrt serve --help` works without it

    return orjson.dumps({"error": message})


def message_of(exc: BaseException) -> str:
    """The one line a client is told: a ``ModrtError``'s own, else that it is internal."""
    return str(exc) if isinstance(exc, ModrtError) else f"internal error: {type(exc).__name__}: {exc}"


def answer(exc: Exception, where: str) -> tuple[int, bytes]:
    """(status, JSON body) for an exception raised while answering ``where``; a bug (not
    a ``ModrtError``) is logged with its traceback."""
    if not isinstance(exc, ModrtError):
        log.error("internal error on %s", where, exc_info=exc)
    return status_of(exc), error_body(message_of(exc))


def install(app, on_failure) -> None:
    """The FastAPI app's handlers: every error answered as ``answer`` does;
    ``on_failure(status, path)`` is told of each one (metrics)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def respond(status: int, body: bytes) -> Response:
        return Response(body, status_code=status, media_type="application/json")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException) -> Response:
        msg = f"no route {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return respond(exc.status_code, error_body(msg))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError) -> Response:
        return respond(400, error_body(f"invalid request: {exc.errors()[:3]}"))

    async def _error(request, exc: Exception) -> Response:
        status, body = answer(exc, f"{request.method} {request.url.path}")
        on_failure(status, request.url.path)
        return respond(status, body)

    # ModrtError on its own: Starlette answers it in the app (a 503 is no server error);
    # Exception is answered by its outermost middleware, which also re-raises it (uvicorn logs).
    app.add_exception_handler(ModrtError, _error)
    app.add_exception_handler(Exception, _error)


__all__ = ["BatcherClosedError", "ModelNotFoundError", "NotReadyError", "PayloadTooLargeError", "LoadError", "STATUS",
           "UnsupportedEncodingError", "answer", "message_of", "error_body", "install", "status_of"]
