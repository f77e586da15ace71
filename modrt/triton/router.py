"""The routing model of a Triton repository written by ``modrt export-triton``: Triton's
Python backend runs this file as ``<router>/1/model.py``.

It answers what ``modrt serve`` answers for the same bundle (``logits``, ``label`` or
``next_token``, ``modules``, and ``h_last`` for a recurrent bundle), and like modrt's
runtime it runs **only the selected modules**, each a Triton model of its own:

    per modular layer    controller (BLS) -> top-K per row (numpy) -> rows grouped by
                         module -> one BLS request per module that got rows, all in
                         flight at once (``async_exec``) -> combine in batch order
    between layers       the glue graphs (pooling), the embedding and head: one BLS each

Ensembles cannot branch (Triton has no conditional execution inside an ensemble), so
the routing is Business Logic Scripting. A recurrent layer costs one round of hops per
time step; with ``recurrent: local`` in ``router.json`` the router runs the recurrent
layers' controller and module graphs itself with ONNX Runtime (one process, no hops),
and only the embedding and head go through Triton.

Numpy routing is modrt's own (``modrt_routing.py``, a copy of ``modrt/routing.py``
written beside this file), so Triton and ``modrt serve`` route identically. Nothing here
imports modrt: Triton's Python environment needs only numpy (and onnxruntime for the
local mode). Per-module row counters: ``modrt_module_rows_total{layer, module}``.
"""

from __future__ import annotations

import asyncio
import json
import os

import modrt_routing as routing
import numpy as np
import triton_python_backend_utils as pb_utils


class _Bls:
    """Calls to other models of the repository, each one ``InferenceRequest``."""

    async def __call__(self, model: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        req = pb_utils.InferenceRequest(
            model_name=model, requested_output_names=outputs,
            inputs=[pb_utils.Tensor(n, np.ascontiguousarray(v)) for n, v in feeds.items()])
        resp = await req.async_exec()
        if resp.has_error():
            raise pb_utils.TritonModelException(f"{model}: {resp.error().message()}")
        return [pb_utils.get_output_tensor_by_name(resp, n).as_numpy() for n in outputs]


class _Local:
    """The same calls run in this process with ONNX Runtime (``recurrent: local``)."""

    def __init__(self, repository: str, models: list[str], threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.sessions = {m: ort.InferenceSession(os.path.join(repository, m, "1", "model.onnx"), opts,
                                                 providers=["CPUExecutionProvider"]) for m in models}

    async def __call__(self, model: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        return self.sessions[model].run(outputs, feeds)


class TritonPythonModel:
    def initialize(self, args):
        here = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(here, "router.json")) as f:
            self.spec = spec = json.load(f)
        self.name = args["model_name"]
        self.bls = _Bls()
        layers = spec["layers"]
        self.local = None
        if spec["topology"] == "recurrent" and spec.get("recurrent") == "local":
            graphs = [g for l in layers for g in [l["controller"]["model"], *(m["model"] for m in l["module_graphs"])]]
            # args["model_repository"] is this model's folder; its siblings are the graphs
            repository = os.path.dirname(os.path.abspath(args["model_repository"]))
            self.local = _Local(repository, graphs, int(spec.get("threads", 1)))
        # The family must outlive its metrics (Triton refuses to count on a deleted family).
        self.family = rows = pb_utils.MetricFamily(
            name="modrt_module_rows_total",
            description="rows each module computed, by routing model, layer and module",
            kind=pb_utils.MetricFamily.COUNTER)
        self.rows = {l["name"]: [rows.Metric(labels={"model": self.name, "layer": l["name"], "module": str(m)})
                                 for m in range(l["modules"])] for l in layers}
        self.K = max(l["k"] for l in layers)

    # --- Triton entry point --------------------------------------------------------

    async def execute(self, requests):
        """Requests of one shape are run as one batch (the router's dynamic batching
        gathers them); each gets its own rows back, or its own error."""
        spec = self.spec
        feeds, errors = [], []
        for r in requests:
            try:
                feeds.append(self._inputs(r))
                errors.append(None)
            except ValueError as exc:
                feeds.append(None)
                errors.append(str(exc))
        responses = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, f in enumerate(feeds):
            if f is not None:
                groups.setdefault(tuple((n, v.shape[1:]) for n, v in sorted(f.items())), []).append(i)
        for idx in groups.values():
            batch = {n: np.concatenate([feeds[i][n] for i in idx]) for n in feeds[idx[0]]}
            try:
                out = await (self._recurrent(batch) if spec["topology"] == "recurrent" else self._feedforward(batch))
            except pb_utils.TritonModelException as exc:
                for i in idx:
                    errors[i] = str(exc)
                continue
            lo = 0
            for i in idx:
                n = feeds[i][spec["input"]].shape[0]
                responses[i] = pb_utils.InferenceResponse(
                    [pb_utils.Tensor(name, np.ascontiguousarray(v[lo:lo + n])) for name, v in out.items()])
                lo += n
        for i, e in enumerate(errors):
            if e is not None:
                responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(e))
        return responses

    def _inputs(self, request) -> dict[str, np.ndarray]:
        spec = self.spec
        t = pb_utils.get_input_tensor_by_name(request, spec["input"])
        x = t.as_numpy()
        if x.shape[0] == 0:
            raise ValueError(f"{spec['input']}: empty batch")
        feeds = {spec["input"]: x}
        if spec["topology"] == "recurrent":
            V = spec["vocab"]
            if x.size and (x.min() < 0 or x.max() >= V):
                raise ValueError(f"tokens: token ids must lie in [0, {V}), got {int(x.min())}..{int(x.max())}")
            h = pb_utils.get_input_tensor_by_name(request, "h")
            if h is not None:
                feeds["h"] = h.as_numpy()
        elif not np.isfinite(x).all():
            raise ValueError(f"{spec['input']}: values must be finite (no NaN or inf)")
        return feeds

    # --- the pipeline (as modrt.runtime.pipeline) ------------------------------------

    async def _graph(self, g: dict, x: np.ndarray) -> np.ndarray:
        return (await self.bls(g["model"], {g["input"]: x}, [g["output"]]))[0]

    async def _feedforward(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.spec
        cur = feeds[spec["input"]]
        B = cur.shape[0]
        modules = np.empty((B, len(spec["layers"]), self.K), np.int32)
        li = 0
        for stage in spec["stages"]:
            if stage["kind"] == "graph":
                cur = await self._graph(stage, cur)
            else:
                layer = spec["layers"][li]
                cur, a = await self._layer(layer, {layer["controller"]["inputs"][0]: cur}, self.bls)
                modules[:, li] = a
                li += 1
        return self._outputs(cur, modules)

    async def _recurrent(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.spec
        tokens = feeds["tokens"]
        B, T = tokens.shape
        layers = spec["layers"]
        h = feeds.get("h")
        hs = [np.zeros((B, l["hidden"]), np.float32) if h is None else np.ascontiguousarray(h[:, i], np.float32)
              for i, l in enumerate(layers)]
        pre = [s for s in spec["stages"] if s["kind"] == "graph" and s["where"] == "pre"]
        post = [s for s in spec["stages"] if s["kind"] == "graph" and s["where"] == "post"]
        cur = tokens
        for g in pre:
            cur = await self._graph(g, cur)
        x_tm = np.ascontiguousarray(np.swapaxes(cur, 0, 1))  # (T, B, E)
        call = self.local or self.bls
        sel = np.empty((T, B, len(layers), self.K), np.int32)
        for li, layer in enumerate(layers):
            state = layer["state"]
            x_name = next(n for n in layer["controller"]["inputs"] if n != state)
            out_tm = np.empty((T, B, layer["hidden"]), np.float32)
            hcur = hs[li]
            for t in range(T):
                hcur, a = await self._layer(layer, {x_name: x_tm[t], state: hcur}, call)
                out_tm[t] = hcur
                sel[t, :, li] = a
            hs[li] = hcur
            x_tm = out_tm
        cur = np.ascontiguousarray(np.swapaxes(x_tm, 0, 1))  # (B, T, H)
        for g in post:
            cur = await self._graph(g, cur)
        out = self._outputs(cur, np.ascontiguousarray(sel.transpose(1, 0, 2, 3)))
        out["h_last"] = np.stack(hs, 1)
        return out

    def _outputs(self, y: np.ndarray, modules: np.ndarray) -> dict[str, np.ndarray]:
        spec = self.spec
        out = {spec["output"]: y}
        if spec.get("argmax"):
            out[spec["argmax"]] = y.argmax(-1).astype(np.int64)
        out["modules"] = modules
        return out

    async def _layer(self, layer: dict, feeds: dict[str, np.ndarray], call) -> tuple[np.ndarray, np.ndarray]:
        """One modular layer on a batch, as ``modrt.runtime.host.HostLayer``: only the
        modules some row selected run, each once, on just its rows, concurrently."""
        ctrl = layer["controller"]
        lp = (await call(ctrl["model"], {n: feeds[n] for n in ctrl["inputs"]}, [ctrl["output"]]))[0]
        a = routing.select(lp, layer["k"], layer["selection"])  # (B, K)
        w = routing.gates(lp, a) if layer["combine"] == "gate" else None
        B = a.shape[0]
        d = routing.dispatch(a, layer["modules"])
        mods = layer["module_graphs"]
        names = mods[0]["inputs"]
        gathered = {n: np.take(feeds[n], d.rows, axis=0) for n in names}
        off = d.offsets
        busy = [m for m in range(layer["modules"]) if off[m + 1] > off[m]]
        results = await asyncio.gather(*(
            call(mods[m]["model"], {n: g[off[m]:off[m + 1]] for n, g in gathered.items()}, [mods[m]["output"]])
            for m in busy))
        first = results[0][0]
        y = np.empty((d.rows.shape[0] + 1, *first.shape[1:]), first.dtype)  # +1: combine's zero pad row
        counters = self.rows[layer["name"]]
        for m, res in zip(busy, results, strict=True):
            y[off[m]:off[m + 1]] = res[0]
            counters[m].increment(off[m + 1] - off[m])
        return routing.combine(y, d, B, layer["combine"], weights=w), a

    def finalize(self):
        self.rows = None  # metrics before their family
        self.family = None
        self.local = None
