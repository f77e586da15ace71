"""FastAPI routes of the KServe v2 / Open Inference Protocol, over a ``DataPlane``.

Handlers are thin: each calls the data plane and returns its pydantic answer. The infer
routes are answered before routing by ``fastpath.InferRoute`` (the hot path, on the bare
ASGI interface), the one infer route there is; the OpenAPI document describes them
(``_openapi``). Errors and their statuses: ``errors.py``.
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response

from modrt._exceptions import InputError
from modrt._version import __version__
from modrt.serve import binary, errors
from modrt.serve.dataplane import DataPlane
from modrt.serve.errors import NotReadyError
from modrt.serve.fastpath import INFER_PATH, InferRoute
from modrt.serve.protocol import (
    ErrorResponse,
    InferenceRequest,
    InferenceResponse,
    ModelConfig,
    ModelMetadata,
    ServerMetadata,
    StatsResponse,
)

ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 500, 503)}


def create_app(plane: DataPlane, max_request_bytes: int = 64 * 2**20, grpc=None, watch=None) -> FastAPI:
    """The ASGI app; the data plane's batcher (and ``grpc``, a ``grpc_server.GrpcServer``,
    and ``watch``, a ``watch.Watcher``, in the same event loop) start and stop with the
    app's lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await plane.start()
        try:
            if grpc is not None:
                await grpc.start()
            if watch is not None:
                await watch.start()
            yield
        finally:
            if watch is not None:
                await watch.stop()
            if grpc is not None:
                await grpc.stop()  # in-flight RPCs finish (readiness is already false)
            await plane.stop()

    app = FastAPI(title="modrt serve", version=__version__, lifespan=lifespan,
                  description="KServe v2 / Open Inference Protocol over modrt's routed runtime, with the "
                              "binary tensor data and statistics extensions.")

    def on_failure(status: int, path: str) -> None:
        if status >= 500 or INFER_PATH.fullmatch(path):
            plane.metrics.observe_failure(status)

    errors.install(app, on_failure)

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

    @app.get("/v2/models/{name}/versions/{version}/ready", responses=ERRORS,
             summary="Model readiness of one version (503 while not ready)")
    async def model_version_ready(name: str, version: str) -> dict:
        if not plane.model_ready(name, version):
            raise NotReadyError(f"model {name!r} version {version!r} is not ready")
        return {"name": name, "version": version, "ready": True}

    @app.get("/v2/models/{name}/config", response_model=ModelConfig, responses=ERRORS,
             summary="Model configuration (Triton model-configuration shape)")
    async def model_config(name: str) -> ModelConfig:
        return plane.config(name)

    @app.get("/v2/models/{name}/stats", response_model=StatsResponse, responses=ERRORS,
             summary="Model statistics (Triton statistics extension)")
    async def model_stats(name: str) -> StatsResponse:
        return plane.statistics(name)

    # --- the model repository extension (Triton's, as tritonclient calls it) ----------

    @app.post("/v2/repository/index", summary="Repository index: the model, its state and why")
    async def repository_index() -> list[dict]:
        return plane.repository_index()

    @app.post("/v2/repository/models/{name}/load", responses=ERRORS,
              summary="Load the bundle on disk again and swap it in without dropping a request")
    async def load(name: str, request: Request) -> dict:
        body = await request.body()
        if body.strip() not in (b"", b"{}"):
            try:
                doc = json.loads(body)
            except ValueError:
                raise InputError("the load request body must be JSON") from None
            if not isinstance(doc, dict) or set(doc) - {"parameters"} or set(doc.get("parameters") or {}):
                raise InputError("load takes no parameters: modrt serves the bundle directory it was started "
                                 "with; export into it, then load")
        version = await plane.load(name)
        return {"name": name, "bundle_version": version}

    @app.post("/v2/repository/models/{name}/unload", responses=ERRORS,
              summary="Stop serving the model (503) until it is loaded again")
    async def unload(name: str) -> dict:
        plane.unload(name)
        return {"name": name, "state": "UNAVAILABLE"}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {}}}})
    async def metrics() -> Response:
        return Response(plane.metrics.render(), media_type=plane.metrics.content_type)

    app.openapi = lambda: _openapi(app)
    app.add_middleware(InferRoute, plane=plane, max_request_bytes=max_request_bytes)
    return app


def _infer_operation(summary: str, params: list[str]) -> dict:
    """The OpenAPI operation of an infer route (``fastpath.InferRoute`` answers it)."""
    error = {"description": "Error", "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    return {"post": {
        "summary": summary, "operationId": "infer_" + "_".join(params),
        "parameters": [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                         "description": f"JSON header of {binary.HEADER} bytes, then tensors"},
        }},
        "responses": {"200": {"description": "Inference response (JSON, or binary tensor data)", "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferenceResponse"}}}},
            **{str(c): error for c in ERRORS}},
    }}


def _openapi(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        req = InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(req.pop("$defs", {}))
        schemas["InferenceRequest"] = req
        for model in (InferenceResponse, ErrorResponse):
            s = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(s.pop("$defs", {}))
            schemas[model.__name__] = s
        doc["paths"]["/v2/models/{name}/infer"] = _infer_operation(
            "Inference (JSON or binary tensor data)", ["name"])
        doc["paths"]["/v2/models/{name}/versions/{version}/infer"] = _infer_operation(
            "Inference on one version", ["name", "version"])
        app.openapi_schema = doc
    return app.openapi_schema


__all__ = ["create_app"]
