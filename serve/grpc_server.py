"""The KServe v2 gRPC front-end (``modrt serve --grpc-port``): the same ``DataPlane`` as HTTP.

    ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata   health and metadata
    ModelInfer   ModelInferRequest -> Request -> DataPlane.answer -> ModelInferResponse

It runs on grpcio's asyncio server in the event loop of the HTTP server, so both feed one
batcher: a gRPC request and an HTTP request can share a batch. Inputs come as
``raw_input_contents`` (what tritonclient sends) or as typed ``contents``; outputs go back
as ``raw_output_contents`` (little-endian, row-major, in the order of ``outputs``), as
Triton answers. Requests are checked as HTTP ones are (``DataPlane.check_header`` before
any data is read), and errors keep their meaning: 400 -> INVALID_ARGUMENT,
404 -> NOT_FOUND, 413 -> RESOURCE_EXHAUSTED, 503 -> UNAVAILABLE, 500 -> INTERNAL, each with
the same one-line message. Messages over ``--max-request-bytes`` are refused by gRPC
itself (RESOURCE_EXHAUSTED). gRPC's own compression (gzip, deflate) needs nothing here.
"""

from __future__ import annotations

import time

import grpc
import numpy as np

from modrt._exceptions import InputError
from modrt.serve import errors
from modrt.serve.dataplane import VERSION, DataPlane
from modrt.serve.grpc_proto import RPCS, SERVICE, pb
from modrt.serve.protocol import DTYPES
from modrt.serve.request import Request, Response

CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
         413: grpc.StatusCode.RESOURCE_EXHAUSTED, 415: grpc.StatusCode.INVALID_ARGUMENT,
         503: grpc.StatusCode.UNAVAILABLE, 500: grpc.StatusCode.INTERNAL}
# datatype -> the InferTensorContents field that carries it
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents"}


def decode(plane: DataPlane, msg) -> Request:
    """A ModelInferRequest as a checked ``Request`` (the header first, then the data)."""
    requested = None
    if msg.outputs:
        requested = []
        for o in msg.outputs:
            if "classification" in o.parameters:
                raise InputError("the classification extension is not supported")
            requested.append((o.name, True))
    header = [(i.name, i.datatype, list(i.shape)) for i in msg.inputs]
    outputs = plane.check_header(header, requested, True)
    raw = msg.raw_input_contents
    if raw and len(raw) != len(msg.inputs):
        raise InputError(f"{len(raw)} raw_input_contents for {len(msg.inputs)} inputs")
    feeds = {}
    for n, inp in enumerate(msg.inputs):
        dtype = np.dtype(DTYPES[inp.datatype])
        count = int(np.prod(inp.shape, dtype=np.int64))
        if raw:
            if len(raw[n]) != count * dtype.itemsize:
                raise InputError(f"input {inp.name!r}: {len(raw[n])} bytes of raw_input_contents, shape "
                                 f"{list(inp.shape)} of {inp.datatype} needs {count * dtype.itemsize}")
            x = np.frombuffer(raw[n], dtype=dtype.newbyteorder("<")).astype(dtype)
        else:
            field = CONTENTS.get(inp.datatype)
            values = getattr(inp.contents, field) if field else ()
            if len(values) != count:
                raise InputError(f"input {inp.name!r}: {len(values)} values in contents.{field or '?'} for shape "
                                 f"{list(inp.shape)} ({count} elements)")
            x = np.asarray(values, dtype=dtype)
        feeds[inp.name] = x.reshape(tuple(inp.shape))
    plane.check_values(feeds)
    return Request(feeds, outputs, msg.id or None)


def encode(plane: DataPlane, response: Response):
    out = pb.ModelInferResponse(model_name=plane.name, model_version=VERSION, id=response.id or "")
    for name, datatype, arr, _ in response.outputs:
        out.outputs.add(name=name, datatype=datatype, shape=arr.shape)
        out.raw_output_contents.append(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes())
    return out


class Servicer:
    """The six RPCs over a ``DataPlane``."""

    def __init__(self, plane: DataPlane):
        self.plane = plane

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.plane.ready)

    async def ModelReady(self, request, context):
        try:
            return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version))
        except errors.ModelNotFoundError:
            return pb.ModelReadyResponse(ready=False)  # as HTTP's 404 reads to tritonclient

    async def ServerMetadata(self, request, context):
        m = self.plane.server_metadata()
        return pb.ServerMetadataResponse(name=m.name, version=m.version, extensions=m.extensions)

    async def ModelMetadata(self, request, context):
        try:
            m = self.plane.metadata(request.name, request.version)
        except Exception as exc:  # noqa: BLE001 - answered with its status
            await _abort(context, exc, "gRPC ModelMetadata")
        t = pb.ModelMetadataResponse_TensorMetadata
        return pb.ModelMetadataResponse(
            name=m.name, versions=m.versions, platform=m.platform,
            inputs=[t(name=i.name, datatype=i.datatype, shape=i.shape) for i in m.inputs],
            outputs=[t(name=o.name, datatype=o.datatype, shape=o.shape) for o in m.outputs])

    async def ModelInfer(self, request, context):
        plane = self.plane
        try:
            res = await plane.answer(request.model_name, request.model_version, lambda: decode(plane, request))
            return encode(plane, res)
        except Exception as exc:  # noqa: BLE001 - answered with its status (a bug: INTERNAL, logged)
            plane.metrics.observe_failure(errors.status_of(exc))
            await _abort(context, exc, f"gRPC ModelInfer {request.model_name!r}")


async def _abort(context, exc: Exception, where: str) -> None:
    """End the RPC with the status code of ``exc``'s HTTP status and its one line (a bug is
    logged with its traceback, as ``errors.answer`` does)."""
    status, _ = errors.answer(exc, where)
    await context.abort(CODES.get(status, grpc.StatusCode.INTERNAL), errors.message_of(exc))


def handler(servicer: Servicer) -> grpc.GenericRpcHandler:
    methods = {}
    for rpc, (req, resp) in RPCS.items():
        methods[rpc] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, rpc), request_deserializer=getattr(pb, req).FromString,
            response_serializer=getattr(pb, resp).SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE, methods)


class GrpcServer:
    """grpcio's asyncio server for a ``DataPlane``; ``start`` and ``stop`` in the serving loop."""

    def __init__(self, plane: DataPlane, host: str, port: int, max_request_bytes: int, max_response_bytes: int,
                 announce=None):
        self.plane, self.host, self.port = plane, host, port
        self.options = [("grpc.max_receive_message_length", max_request_bytes),
                        ("grpc.max_send_message_length", max_response_bytes + (1 << 20)),
                        ("grpc.so_reuseport", 0)]  # a port in use is an error, not a shared port
        self.announce = announce
        self.server = None

    async def start(self) -> int:
        self.server = grpc.aio.server(options=self.options)
        self.server.add_generic_rpc_handlers((handler(Servicer(self.plane)),))
        host = f"[{self.host}]" if ":" in self.host else self.host
        try:
            self.port = self.server.add_insecure_port(f"{host}:{self.port}")
        except RuntimeError as exc:
            raise errors.ModrtError(f"cannot listen on {self.host}:{self.port} for gRPC: {exc}") from None
        await self.server.start()
        if self.announce:
            self.announce(f"modrt serve: gRPC (KServe v2) on {host}:{self.port}")
        return self.port

    async def stop(self, grace: float = 5.0) -> None:
        if self.server is not None:
            t0 = time.monotonic()
            await self.server.stop(grace)
            self.server = None
            errors.log.debug("gRPC server stopped in %.2f s", time.monotonic() - t0)


__all__ = ["GrpcServer", "Servicer", "decode", "encode", "handler"]
