"""The data plane: model metadata, readiness and inference, without HTTP.

``app.py`` turns routes into calls here; tests can drive it directly. Every request is
parsed and validated completely (names, datatypes, shapes, element counts, token ids)
*before* it joins a batch, so a bad request is refused alone and never disturbs others.

Tensors (DESIGN.md §7):

    recurrent      input  tokens INT64 [-1, -1]            (batch, time)
                   output logits FP32 [-1, -1, V], next_token INT64 [-1, -1],
                          modules INT32 [-1, -1, L, K]
    feed-forward   input  <manifest input> FP32 [-1, D]
                   output <manifest output> FP32 [-1, D_out] (+ label INT64 [-1] for logits),
                          modules INT32 [-1, L, K]
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from pydantic import ValidationError

from modrt._exceptions import InputError, ModrtError
from modrt._version import __version__
from modrt.runtime.model import Model
from modrt.runtime.signature import Tensor
from modrt.serve import binary
from modrt.serve.batcher import BatchConfig, Batcher
from modrt.serve.errors import ModelNotFoundError, NotReadyError
from modrt.serve.metrics import Metrics
from modrt.serve.protocol import (
    DTYPES,
    InferenceRequest,
    ModelConfig,
    ModelMetadata,
    ServerMetadata,
    StatsResponse,
    TensorMetadata,
)
from modrt.serve.stats import Stats

VERSION = "1"  # a bundle is one model version
EXTENSIONS = ["binary_tensor_data", "statistics"]


class DataPlane:
    """One model behind the v2 protocol: metadata, readiness, validated batched inference."""

    def __init__(self, model: Model, name: str | None = None, batch: BatchConfig | None = None):
        self.model = model
        self.name = name or str(model.manifest.task.get("name", "model"))
        self.batch_config = batch = batch or BatchConfig()
        self.ready = False
        self.signature = sig = model.signature  # metadata and validation: the model's own
        self.metrics = Metrics(self.name, [l.name for l in model.manifest.layers])
        self.stats = Stats(self.name, VERSION)
        self.batcher = Batcher(self._run, batch, on_batch=self._on_batch)
        self.inputs = [_metadata(t) for t in sig.inputs]
        self.outputs = [_metadata(t) for t in sig.outputs]
        self._outputs = {t.name: t for t in self.outputs}

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        await self.batcher.start()
        self.ready = True

    async def stop(self) -> None:
        """Refuse new requests, finish the queued ones."""
        self.ready = False
        await self.batcher.stop()

    # --- metadata --------------------------------------------------------------------

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(name="modrt", version=__version__, extensions=EXTENSIONS)

    def check_model(self, name: str, version: str | None = None) -> None:
        if name != self.name or version not in (None, "", VERSION):
            v = f" version {version!r}" if version else ""
            raise ModelNotFoundError(f"unknown model {name!r}{v}; this server serves {self.name!r} "
                                     f"(version {VERSION})")

    def metadata(self, name: str, version: str | None = None) -> ModelMetadata:
        self.check_model(name, version)
        return ModelMetadata(name=self.name, versions=[VERSION], platform=self._platform(),
                             inputs=self.inputs, outputs=self.outputs)

    def config(self, name: str, version: str | None = None) -> ModelConfig:
        self.check_model(name, version)
        m = self.model.manifest

        def dims(t: TensorMetadata) -> list[int]:
            return t.shape[1:]  # Triton's config leaves out the batch dimension

        return ModelConfig(
            name=self.name, platform=self._platform(), max_batch_size=self.batch_config.max_batch,
            input=[{"name": t.name, "data_type": f"TYPE_{t.datatype}", "dims": dims(t)} for t in self.inputs],
            output=[{"name": t.name, "data_type": f"TYPE_{t.datatype}", "dims": dims(t)} for t in self.outputs],
            dynamic_batching={"max_queue_delay_microseconds": self.batch_config.max_queue_delay_us},
            parameters={"topology": m.topology, "provider": self.model.provider, "strategy": self.model.strategy,
                        "layers": [{"name": l.name, "modules": l.modules, "k": l.k, "combine": l.combine}
                                   for l in m.layers]})

    def model_ready(self, name: str, version: str | None = None) -> bool:
        self.check_model(name, version)
        return self.ready

    def statistics(self, name: str, version: str | None = None) -> StatsResponse:
        self.check_model(name, version)
        return self.stats.response()

    def _platform(self) -> str:
        return f"modrt_{self.model.manifest.topology}"

    # --- inference -------------------------------------------------------------------

    async def infer(self, name: str, body: bytes, header_length: str | None = None,
                    version: str | None = None) -> tuple[bytes, dict[str, str]]:
        """Answer one infer request: (response body, response headers). Raises ModrtError."""
        t0 = time.perf_counter_ns()
        self.check_model(name, version)
        if not self.ready:
            raise NotReadyError(f"model {self.name!r} is not ready")
        try:
            req, x = self.parse(body, header_length)
            wanted = self._requested(req)
            result = await self.batcher.submit(x)
        except ModrtError:  # BatcherClosedError too: it stopped after the readiness check (shutdown)
            self.stats.request_failed(time.perf_counter_ns() - t0)
            raise
        outs = result.outputs
        payload: list[np.ndarray] = []
        outputs: list[dict[str, Any]] = []
        for out_name, as_binary in wanted:
            meta = self._outputs[out_name]
            arr = np.ascontiguousarray(outs[out_name], dtype=DTYPES[meta.datatype])
            o: dict[str, Any] = {"name": out_name, "shape": list(arr.shape), "datatype": meta.datatype}
            if as_binary:
                o["parameters"] = {"binary_data_size": arr.nbytes}
                payload.append(arr)
            else:
                o["data"] = binary.tensor_json(arr)
            outputs.append(o)
        response: dict[str, Any] = {"model_name": self.name, "model_version": VERSION, "outputs": outputs}
        if req.id is not None:
            response["id"] = req.id
        encoded = binary.encode_response(response, payload)
        total = time.perf_counter_ns() - t0
        self.stats.request_ok(total, result.timing)
        self.metrics.observe_request(total / 1e9, result.timing.queue_ns / 1e9)
        return encoded

    def parse(self, body: bytes, header_length: str | None = None) -> tuple[InferenceRequest, np.ndarray]:
        """A validated request and its one input tensor, ready to batch. Raises InputError."""
        header, tail = binary.split_body(body, header_length)
        obj = binary.parse_json(header)
        try:
            req = InferenceRequest.model_validate(obj)
        except ValidationError as exc:
            raise InputError(f"invalid inference request: {_pydantic_message(exc)}") from None
        want = self.inputs[0]
        names = [i.name for i in req.inputs]
        if names != [want.name]:
            raise InputError(f"model {self.name!r} takes exactly one input, {want.name!r} "
                             f"({want.datatype} {want.shape}); got {names}")
        inp = req.inputs[0]
        if inp.datatype != want.datatype:
            raise InputError(f"input {inp.name!r}: datatype {inp.datatype}, the model expects {want.datatype}")
        t = self.signature.check_shape(inp.name, inp.shape)  # before decoding: nothing allocated
        x, used = binary.decode_input(inp, tail, 0)  # counts elements (negative dims, overflow)
        if used != len(tail):
            raise InputError(f"{len(tail) - used} bytes of binary data after the tensors were not used")
        self.signature.check_bounds(t, x)
        return req, x

    def _requested(self, req: InferenceRequest) -> list[tuple[str, bool]]:
        """[(output name, binary?)]: the requested outputs, or all of them."""
        default = req.parameters.get("binary_data_output", False)
        if not isinstance(default, bool):
            raise InputError("parameter binary_data_output must be a boolean")
        if req.outputs is None:
            return [(t.name, default) for t in self.outputs]
        seen: list[str] = []
        out = []
        for o in req.outputs:
            if o.name not in self._outputs:
                raise InputError(f"unknown output {o.name!r}; model {self.name!r} has {list(self._outputs)}")
            if o.name in seen:
                raise InputError(f"output {o.name!r} is requested twice")
            seen.append(o.name)
            b = o.parameters.get("binary_data", default)
            if not isinstance(b, bool):
                raise InputError(f"output {o.name!r}: parameter binary_data must be a boolean")
            if "classification" in o.parameters:
                raise InputError("the classification extension is not supported")
            out.append((o.name, b))
        return out

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The routed runtime on one merged batch (runs in the batcher's thread)."""
        out = self.model.run(**{self.signature.input.name: x})
        self.metrics.observe_routing(out["modules"])  # once per batch, off the event loop
        return {k: v for k, v in out.items() if k in self._outputs}

    def _on_batch(self, rows: int, timings: list) -> None:
        self.stats.execution(rows, timings)
        self.metrics.observe_batch(rows)


def _metadata(t: Tensor) -> TensorMetadata:
    return TensorMetadata(name=t.name, datatype=DTYPES.name_of(t.dtype), shape=list(t.shape))


def _pydantic_message(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors()[:3]:
        loc = ".".join(str(p) for p in e["loc"]) or "body"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


__all__ = ["DataPlane"]
