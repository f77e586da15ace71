"""The data plane: model metadata, readiness and inference, without a transport.

``app.py`` and ``fastpath.py`` turn HTTP routes into calls here, ``grpc_server.py`` the
gRPC RPCs; ``answer`` takes a front-end's decoding of a transport-neutral ``Request``
(``request.py``; the HTTP/REST bodies decode to it in ``codec.py``, gRPC messages in
``grpc_server.py``), so both share the checks, the batcher, statistics and metrics. Every request is
validated completely (names, datatypes, shapes, element counts, token ids) *before* it
joins a batch, so a bad request is refused alone and never disturbs others.

Tensors and their shapes come from the model's signature (``Model.signature``,
``modrt/runtime/signature.py``), e.g. for PTB: inputs ``tokens`` INT64 [-1, -1] and the
optional start state ``h`` FP32 [-1, L, H]; outputs ``logits`` FP32 [-1, -1, V],
``next_token`` INT64 [-1, -1], ``modules`` INT32 [-1, -1, L, K], ``h_last`` FP32
[-1, L, H] (send it back as ``h`` with the next tokens to continue a stream); a
feed-forward classifier answers ``label`` INT64 [-1].

Limits, checked from the request header before anything is decoded or run: at most
``max_tokens`` positions a request (rows x time steps; rows for a feed-forward model; more
is 413), and an answer of at most ``max_response_bytes`` (estimated from the shapes of the
outputs asked for; more is 400 naming the way out: fewer outputs, binary data, fewer
tokens). Outputs are computed only when some request of the batch asks for them: a request
for ``next_token`` alone never holds the (B, T, V) logits. A batch holds at most
``max_tokens`` positions too, so the work and memory of one run stay bounded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable

import numpy as np

from modrt._exceptions import InputError, ModrtError
from modrt._version import __version__
from modrt.runtime.model import Model
from modrt.runtime.signature import Tensor
from modrt.serve import binary, codec
from modrt.serve.batcher import BatchConfig, Batcher
from modrt.serve.errors import LoadError, ModelNotFoundError, NotReadyError, PayloadTooLargeError
from modrt.serve.metrics import Metrics
from modrt.serve.protocol import (
    DTYPES,
    ModelConfig,
    ModelMetadata,
    ServerMetadata,
    StatsResponse,
    TensorMetadata,
)
from modrt.serve.request import Request, Response
from modrt.serve.stats import Stats

log = logging.getLogger("modrt.serve")
VERSION = "1"  # a bundle is one model version
EXTENSIONS = ["binary_tensor_data", "statistics", "model_repository"]


class Served:
    """Everything a request is checked and run against, derived once from one loaded model:
    a reload swaps in a new one whole (``DataPlane.load``), and a request keeps the one it
    was decoded against until it is answered."""

    def __init__(self, model: Model):
        self.model = model
        self.signature = sig = model.signature  # metadata and validation: the model's own
        # Which bundle answers (the metrics' label): a digest of its manifest, which holds
        # every graph's sha256.
        self.version = hashlib.sha256(json.dumps(model.manifest.to_json(), sort_keys=True, default=str).encode()
                                      ).hexdigest()[:12]
        self.layers = [l.name for l in model.manifest.layers]
        self.inputs = [_metadata(t) for t in sig.inputs]
        self.outputs = [_metadata(t) for t in sig.outputs]
        self.out_meta = {t.name: t for t in self.outputs}
        self.in_meta = {t.name: t for t in self.inputs}
        self.optional = {t.name for t in sig.inputs if t.optional}
        self.sig_inputs = {t.name: t for t in sig.inputs}
        self.first = sig.input.name
        # Per output, for the answer's size: (product of its fixed axes, how many leading -1
        # axes it takes from the first input, bytes of an element as binary, at most as JSON).
        self.cost = {t.name: (math.prod(d for d in t.shape if d != -1), sum(d == -1 for d in t.shape),
                              np.dtype(t.dtype).itemsize, binary.JSON_BYTES.get(t.dtype, 25)) for t in sig.outputs}


class DataPlane:
    """One model behind the v2 protocol: metadata, readiness, validated batched inference,
    and (with a ``loader``) loading a new bundle in place of the served one."""

    def __init__(self, model: Model, name: str | None = None, batch: BatchConfig | None = None,
                 max_tokens: int = 8192, max_response_bytes: int = 64 * 2**20,
                 loader: Callable[[], Model] | None = None):
        self.served = Served(model)
        self.name = name or str(model.manifest.task.get("name", "model"))
        batch = batch or BatchConfig()
        if batch.max_cost is None:  # a run's positions are capped as a request's are
            batch = dataclasses.replace(batch, max_cost=max_tokens)
        self.batch_config = batch
        self.max_tokens = max_tokens
        self.max_response_bytes = max_response_bytes
        self.ready = False  # the server takes requests (false while starting and draining)
        self.loaded = True  # the model is loaded (false after an unload)
        self.loader = loader  # () -> a freshly loaded Model of the bundle on disk; None: no reloads
        self._loading = asyncio.Lock()
        self.metrics = Metrics(self.name)
        self.stats = Stats(self.name, VERSION)
        self.batcher = Batcher(self._run, batch, on_batch=self._on_batch)

    # The served model's parts, as attributes (a snapshot: ``served`` may be swapped).
    model = property(lambda self: self.served.model)
    signature = property(lambda self: self.served.signature)
    inputs = property(lambda self: self.served.inputs)
    outputs = property(lambda self: self.served.outputs)

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
                             inputs=self.served.inputs, outputs=self.served.outputs)

    def config(self, name: str, version: str | None = None) -> ModelConfig:
        self.check_model(name, version)
        s = self.served
        m = s.model.manifest

        def dims(t: TensorMetadata) -> list[int]:
            return t.shape[1:]  # Triton's config leaves out the batch dimension

        return ModelConfig(
            name=self.name, platform=self._platform(), max_batch_size=self.batch_config.max_batch,
            input=[{"name": t.name, "data_type": f"TYPE_{t.datatype}", "dims": dims(t),
                    **({"optional": True} if t.name in s.optional else {})} for t in s.inputs],
            output=[{"name": t.name, "data_type": f"TYPE_{t.datatype}", "dims": dims(t)} for t in s.outputs],
            dynamic_batching={"max_queue_delay_microseconds": self.batch_config.max_queue_delay_us},
            parameters={"topology": m.topology, "provider": s.model.provider, "strategy": s.model.strategy,
                        "bundle_version": s.version,
                        "layers": [{"name": l.name, "modules": l.modules, "k": l.k, "combine": l.combine}
                                   for l in m.layers]})

    def model_ready(self, name: str, version: str | None = None) -> bool:
        self.check_model(name, version)
        return self.ready and self.loaded

    def _check_ready(self) -> None:
        if not self.ready:
            raise NotReadyError(f"model {self.name!r} is not ready")
        if not self.loaded:
            raise NotReadyError(f"model {self.name!r} is unloaded; POST /v2/repository/models/{self.name}/load "
                                "loads it")

    # --- the model repository extension ----------------------------------------------

    def repository_index(self) -> list[dict[str, str]]:
        """Triton's repository index: this server's one model, its state and why."""
        state = "READY" if self.ready and self.loaded else "UNAVAILABLE"
        reason = "" if state == "READY" else ("unloaded" if not self.loaded else "the server is not ready")
        return [{"name": self.name, "version": VERSION, "state": state, "reason": reason}]

    async def load(self, name: str) -> str:
        """Load the bundle on disk again (``loader``, in a worker thread: it validates every
        graph and measures strategies) and swap it in for the served model at once: requests
        decoded before the swap finish on the old model, later ones run on the new, none
        fails. A bundle that does not load leaves the old one serving and raises its one-line
        error. Returns the new bundle version."""
        self.check_model(name)
        if self.loader is None:
            raise InputError("this server cannot reload: it was not started from a bundle directory")
        async with self._loading:  # one load at a time
            old = self.served.version
            try:
                model = await asyncio.get_running_loop().run_in_executor(None, self.loader)
                served = Served(model)
            except ModrtError as exc:
                log.warning("load of model %r refused, version %s keeps serving: %s", self.name, old, exc)
                raise LoadError(f"load of model {self.name!r} refused (version {old} keeps serving): {exc}") from None
            self.served, self.loaded = served, True  # one assignment: the swap
            log.info("model %r: version %s -> %s", self.name, old, served.version)
            return served.version

    def unload(self, name: str) -> None:
        """Stop answering inference for the model (503) until it is loaded again."""
        self.check_model(name)
        self.loaded = False

    def statistics(self, name: str, version: str | None = None) -> StatsResponse:
        self.check_model(name, version)
        return self.stats.response()

    def _platform(self) -> str:
        return f"modrt_{self.served.model.manifest.topology}"

    # --- inference -------------------------------------------------------------------

    async def infer(self, name: str, body: bytes, header_length: str | None = None,
                    version: str | None = None) -> tuple[bytes, dict[str, str]]:
        """Answer one HTTP/REST infer body: (response body, response headers), through
        ``codec`` and ``answer``. Raises ModrtError."""
        res = await self.answer(name, version, lambda: codec.decode(self, body, header_length))
        return codec.encode(self.name, VERSION, res)

    async def answer(self, name: str, version: str | None, decode: Callable[[], Request]) -> Response:
        """One request of any front-end: the model and readiness checked, ``decode()`` (the
        front-end's decoding and checks, which raise InputError) counted as a failed
        request when it fails, then ``run``. Raises ModrtError."""
        t0 = time.perf_counter_ns()
        self.check_model(name, version)
        self._check_ready()
        try:
            req = decode()
        except ModrtError:
            self.stats.request_failed(time.perf_counter_ns() - t0)
            raise
        return await self.run(req, t0)

    async def run(self, req: Request, t0: int | None = None) -> Response:
        """One decoded request through the batcher: the outputs it asked for, in the
        protocol's datatypes. Counts it in the statistics and metrics (from ``t0``,
        perf_counter_ns, when the front-end began with it)."""
        t0 = time.perf_counter_ns() if t0 is None else t0
        self._check_ready()
        s = self.served  # the model the request was decoded against (no await since): it runs there
        try:
            result = await self.batcher.submit(req.inputs, frozenset(n for n, _ in req.outputs),
                                               s.signature.positions(req.inputs[s.first].shape), s)
        except ModrtError:  # BatcherClosedError too: it stopped after the readiness check (shutdown)
            self.stats.request_failed(time.perf_counter_ns() - t0)
            raise
        outs = []
        for out_name, as_binary in req.outputs:
            dt = s.out_meta[out_name].datatype
            outs.append((out_name, dt, np.ascontiguousarray(result.outputs[out_name], dtype=DTYPES[dt]), as_binary))
        total = time.perf_counter_ns() - t0
        self.stats.request_ok(total, result.timing)
        self.metrics.observe_request(total / 1e9, result.timing.queue_ns / 1e9, s.version)
        return Response(outs, req.id)

    # --- validation, for any front-end ------------------------------------------------

    def check_header(self, inputs: list[tuple[str, str | None, list[int] | None]],
                     requested: list[tuple[str, bool | None]] | None, default: bool) -> list[tuple[str, bool]]:
        """A request's header, before any data is decoded: ``inputs`` [(name, datatype,
        shape)] are the model's, the outputs asked for exist, and the work and the answer are
        within the limits. Returns the outputs to answer, as ``choose_outputs``."""
        s = self.served
        sig = s.signature
        if len(inputs) != 1 or inputs[0][0] != s.first:  # the common case (one required input) is cheap
            try:
                sig.check_names([i[0] for i in inputs])
            except InputError as exc:
                raise InputError(f"model {self.name!r}: {exc}") from None
        first = None
        for name, datatype, shape in inputs:
            want = s.in_meta[name]
            if datatype != want.datatype:
                raise InputError(f"input {name!r}: datatype {datatype}, the model expects {want.datatype}")
            binary.element_count(shape, name)  # negative dimensions, int64 overflow: 400
            sig.check_shape(name, shape)
            if name == s.first:
                first = shape
        if len(inputs) > 1:
            sig.check_batch({name: shape for name, _, shape in inputs})
        outputs = self.choose_outputs(requested, default)
        lead = sig.lead(first)  # batch (and time)
        n = math.prod(lead)
        if n > self.max_tokens:
            raise PayloadTooLargeError(
                f"input {sig.input.name!r} of shape {list(first)} asks for {n} positions; this server takes at most "
                f"{self.max_tokens} a request (modrt serve --max-tokens)")
        size = 0
        for name, as_binary in outputs:
            fixed, nlead, itemsize, json_bytes = s.cost[name]  # elements = fixed x its leading axes
            size += fixed * math.prod(lead[:nlead]) * (itemsize if as_binary else json_bytes)
        if size > self.max_response_bytes:
            raise InputError(
                f"the answer would take up to {size / 2**20:.1f} MiB ({', '.join(n for n, _ in outputs)}), over this "
                f"server's {self.max_response_bytes / 2**20:.1f} MiB (modrt serve --max-response-bytes): ask for fewer "
                f"outputs (e.g. only next_token), for binary data, or send fewer tokens")
        return outputs

    def check_values(self, feeds: dict[str, np.ndarray]) -> None:
        """The decoded inputs' values (token ids in range)."""
        s = self.served
        for name, x in feeds.items():
            s.signature.check_bounds(s.sig_inputs[name], x)

    def choose_outputs(self, requested: list[tuple[str, bool | None]] | None, default: bool
                       ) -> list[tuple[str, bool]]:
        """[(output name, binary?)]: the requested outputs (None: all of them), each known
        and asked once; ``default`` where a request leaves binary open."""
        known = self.served.out_meta
        if requested is None:
            return [(t.name, default) for t in known.values()]
        seen: set[str] = set()
        out = []
        for name, b in requested:
            if name not in known:
                raise InputError(f"unknown output {name!r}; model {self.name!r} has {list(known)}")
            if name in seen:
                raise InputError(f"output {name!r} is requested twice")
            seen.add(name)
            out.append((name, default if b is None else b))
        return out

    def _run(self, feeds: dict[str, np.ndarray], want: frozenset[str] | None, s: Served) -> dict[str, np.ndarray]:
        """The routed runtime of ``s`` (the model its requests were decoded against) on one
        merged batch (runs in the batcher's thread): the outputs some request of it wants."""
        # Every request was checked when it was decoded (check_header, check_values): the
        # merged batch is not validated again.
        out = s.model.run_checked(feeds, want)
        self.metrics.observe_routing(out["modules"], s.layers, s.version)  # once per batch, off the event loop
        return {k: v for k, v in out.items() if k in s.out_meta}

    def _on_batch(self, rows: int, timings: list) -> None:
        self.stats.execution(rows, timings)
        self.metrics.observe_batch(rows)


def _metadata(t: Tensor) -> TensorMetadata:
    return TensorMetadata(name=t.name, datatype=DTYPES.name_of(t.dtype), shape=list(t.shape))


__all__ = ["DataPlane"]
