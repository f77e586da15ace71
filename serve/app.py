"""FastAPI routes of the KServe v2 / Open Inference Protocol, over a ``DataPlane``.

Handlers are thin: each calls the data plane and returns its pydantic answer. The infer
routes are answered before routing by ``fastpath.InferRoute`` (the hot path, on the bare
ASGI interface); here they are declared for the OpenAPI document only. Errors
are JSON ``{"error": "..."}`` (the field tritonclient reads) with the status a v2 client
expects:

    InputError (malformed body, tensors, dtypes, shapes, ids)   400
    ModelNotFoundError, unknown route                          404
    PayloadTooLargeError (over --max-request-bytes)            413
    NotReadyError (starting or draining)                       503
    anything else                                              500 (the server stays up)
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from modrt._exceptions import ModrtError
from modrt._version import __version__
from modrt.serve import binary
from modrt.serve.dataplane import DataPlane, NotReadyError
from modrt.serve.fastpath import InferRoute, status_of
from modrt.serve.protocol import (
    ErrorResponse,
    InferenceRequest,
    InferenceResponse,
    ModelConfig,
    ModelMetadata,
    ServerMetadata,
    StatsResponse,
)

log = logging.getLogger("modrt.serve")

ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 503)}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(plane: DataPlane, max_request_bytes: int = 64 * 2**20) -> FastAPI:
    """The ASGI app; the data plane's batcher starts and stops with the app's lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await plane.start()
        try:
            yield
        finally:
            await plane.stop()

    app = FastAPI(title="modrt serve", version=__version__, lifespan=lifespan,
                  description="KServe v2 / Open Inference Protocol over modrt's routed runtime, with the "
                              "binary tensor data and statistics extensions.")

    @app.exception_handler(ModrtError)
    async def _modrt_error(request: Request, exc: ModrtError) -> JSONResponse:
        code = status_of(exc)
        if request.url.path.endswith("/infer"):
            plane.metrics.observe_failure(code)
        return _error(code, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = f"no route {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return _error(exc.status_code, msg)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, f"invalid request: {exc.errors()[:3]}")

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        plane.metrics.observe_failure(500)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    # --- health and metadata ---------------------------------------------------------

    @app.get("/v2/health/live", responses=ERRORS, summary="Server liveness")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready", responses=ERRORS, summary="Server readiness (503 while not ready)")
    async def ready() -> dict:
        if not plane.ready:
            raise NotReadyError("server is not ready")
        return {"ready": True}

    @app.get("/v2", response_model=ServerMetadata, summary="Server metadata")
    async def server_metadata() -> ServerMetadata:
        return plane.server_metadata()

    @app.get("/v2/models/stats", response_model=StatsResponse, summary="Statistics of every model")
    async def all_stats() -> StatsResponse:
        return plane.stats.response()

    @app.get("/v2/models/{name}", response_model=ModelMetadata, responses=ERRORS, summary="Model metadata")
    async def model_metadata(name: str) -> ModelMetadata:
        return plane.metadata(name)

    @app.get("/v2/models/{name}/versions/{version}", response_model=ModelMetadata, responses=ERRORS,
             summary="Model metadata (one version)")
    async def model_version_metadata(name: str, version: str) -> ModelMetadata:
        return plane.metadata(name, version)

    @app.get("/v2/models/{name}/ready", responses=ERRORS, summary="Model readiness (503 while not ready)")
    async def model_ready(name: str) -> dict:
        if not plane.model_ready(name):
            raise NotReadyError(f"model {name!r} is not ready")
        return {"name": name, "ready": True}

    @app.get("/v2/models/{name}/config", response_model=ModelConfig, responses=ERRORS,
             summary="Model configuration (Triton model-configuration shape)")
    async def model_config(name: str) -> ModelConfig:
        return plane.config(name)

    @app.get("/v2/models/{name}/stats", response_model=StatsResponse, responses=ERRORS,
             summary="Model statistics (Triton statistics extension)")
    async def model_stats(name: str) -> StatsResponse:
        return plane.statistics(name)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {}}}})
    async def metrics() -> Response:
        return Response(plane.metrics.render(), media_type=plane.metrics.content_type)

    # --- inference -------------------------------------------------------------------

    async def _infer(request: Request, name: str, version: str | None) -> Response:
        raise AssertionError("the infer routes are answered by fastpath.InferRoute")  # for the OpenAPI doc

    infer_doc = dict(response_model=InferenceResponse, responses=ERRORS, openapi_extra=_infer_body(),
                     response_class=Response)

    @app.post("/v2/models/{name}/infer", summary="Inference (JSON or binary tensor data)", **infer_doc)
    async def infer(name: str, request: Request) -> Response:
        return await _infer(request, name, None)

    @app.post("/v2/models/{name}/versions/{version}/infer", summary="Inference on one version", **infer_doc)
    async def infer_version(name: str, version: str, request: Request) -> Response:
        return await _infer(request, name, version)

    app.openapi = lambda: _openapi(app)
    app.add_middleware(InferRoute, plane=plane, max_request_bytes=max_request_bytes)
    return app


def _infer_body() -> dict:
    """The infer request body for OpenAPI: the route reads it by hand (JSON + binary)."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                     "description": f"JSON header of {binary.HEADER} bytes, then tensors"},
    }}}


def _openapi(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        req = InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(req.pop("$defs", {}))
        schemas["InferenceRequest"] = req
        app.openapi_schema = doc
    return app.openapi_schema


__all__ = ["create_app", "status_of"]
