"""A Triton model repository from a bundle (``modrt export-triton OUT/ REPO/``).

    REPO/
      models/                                      the Triton model repository
                                                   (``tritonserver --model-repository REPO/models``)
        <graph>/config.pbtxt, <graph>/1/model.onnx every ONNX graph of the bundle (each
                                                   module, controller, glue, head, dense
                                                   baseline) as its own model, so each can
                                                   be placed and scaled on its own
        <name>/config.pbtxt, <name>/1/model.py     the routing model (Python backend, BLS):
               1/router.json, 1/modrt_routing.py   what ``modrt serve`` answers, running
                                                   only the selected modules
      kserve/                                      InferenceServices (Triton, modrt serve)
                                                   and a Dockerfile for modrt's image
      .modrt-triton                                what wrote the repository (``--force``)

The model repository is a folder of its own because Triton, started without
``--model-control-mode explicit`` (as KServe's Triton runtime starts it), loads every
sub-folder and refuses to start when one is not a model (``kserve/`` would be).

Configs are text protobuf (``ModelConfig``); ``validate`` parses each with Triton's own
``model_config_pb2`` (from ``tritonclient``) where it is installed, and checks every ONNX
model's ``dims`` and datatypes against the graph itself. Dims leave out the batch axis
(``max_batch_size`` > 0); -1 marks a variable axis (a language model's time axis).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modrt import bundle
from modrt._exceptions import BundleError, InputError, ModrtError
from modrt.runtime import signature as sig

DATATYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
             "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8"}
MARKER = ".modrt-triton"
MODELS = "models"  # REPO/models: the Triton model repository itself
RECURRENT_MODES = ("local", "bls")
ONNX_BACKENDS = ("onnxruntime", "python")
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Options:
    """How the repository is written; the CLI's options, one to one."""

    name: str | None = None  # the routing model's name [default: the bundle's task name]
    prefix: str = ""  # put before every graph's model name (several bundles in one repository)
    max_batch: int = 64
    instances: int = 1  # instance_group count of every model
    threads: int = 1  # ORT intra-op threads per instance
    gpu: bool = False  # KIND_GPU instances for the ONNX models
    tensorrt: bool = False  # the TensorRT accelerator block on the ONNX models (implies gpu)
    fp16: bool = False  # TensorRT precision FP16
    trt_cache: str = "/tmp/triton-trt-cache"
    max_seq: int = 512  # TensorRT profile: the longest time axis (embedding, head)
    queue_delay_us: int = 100  # dynamic batching of every model
    recurrent: str = "local"  # recurrent layers: in the router ("local") or one BLS hop per step
    onnx_backend: str = "onnxruntime"  # "python": ONNX graphs served by a Python model running ORT
    storage_uri: str | None = None  # where the repository will live, for kserve/ (placeholder otherwise)
    bundle_uri: str | None = None  # where the bundle will live, for modrt serve's InferenceService
    image: str = "modrt-serve:latest"

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise InputError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.instances < 1 or self.threads < 0:
            raise InputError("--instances must be >= 1 and --threads >= 0")
        if self.fp16 and not self.tensorrt:
            raise InputError("--fp16 is TensorRT's precision: pass --tensorrt too")
        if self.recurrent not in RECURRENT_MODES:
            raise InputError(f"recurrent mode {self.recurrent!r} unknown; choose one of {RECURRENT_MODES}")
        if self.onnx_backend not in ONNX_BACKENDS:
            raise InputError(f"onnx backend {self.onnx_backend!r} unknown; choose one of {ONNX_BACKENDS}")
        if self.onnx_backend == "python" and (self.gpu or self.tensorrt):
            raise InputError("--onnx-backend python runs ONNX Runtime on the CPU: leave out --gpu/--tensorrt")


# --- text protobuf ------------------------------------------------------------------


def _pb(value: Any, indent: int = 0) -> str:
    """A dict as protobuf text: lists of dicts repeat the field, strings are quoted,
    names in UPPER_CASE (enums) and numbers are written bare."""
    pad = "  " * indent
    lines = []
    for key, v in value.items():
        for item in v if isinstance(v, list) and (not v or isinstance(v[0], dict)) else [v]:
            if isinstance(item, dict):
                lines.append(f"{pad}{key} {{\n{_pb(item, indent + 1)}{pad}}}\n")
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}\n")
    return "".join(lines)


class Enum(str):
    """A protobuf enum value (written bare)."""


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Enum):
        return str(v)
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, list):
        return "[ " + ", ".join(_scalar(x) for x in v) + " ]"
    return json.dumps(str(v))


def _tensor(name: str, dtype: str, shape: tuple[int, ...], optional: bool = False) -> dict[str, Any]:
    if dtype not in DATATYPES:
        raise BundleError(f"tensor {name!r}: dtype {dtype} has no Triton datatype")
    if not shape or shape[0] != -1:
        raise BundleError(f"tensor {name!r} {list(shape)}: its first axis must be the (dynamic) batch axis")
    t: dict[str, Any] = {"name": name, "data_type": Enum(DATATYPES[dtype]), "dims": list(shape[1:])}
    if not shape[1:]:  # one value per row: Triton wants a dim, the model gives (B,)
        t["dims"] = [1]
        t["reshape"] = {"shape": []}
    if optional:
        t["optional"] = True
    return t


def _param(key: str, value: Any) -> dict[str, Any]:
    return {"key": key, "value": {"string_value": str(value)}}


def onnx_config(model: str, spec: bundle.GraphSpec, opts: Options) -> str:
    """config.pbtxt of one ONNX graph."""
    cfg: dict[str, Any] = {"name": model}
    if opts.onnx_backend == "python":
        cfg["backend"] = "python"
    else:
        cfg["platform"] = "onnxruntime_onnx"
    cfg["max_batch_size"] = opts.max_batch
    cfg["input"] = [_tensor(t.name, t.dtype, t.shape) for t in spec.inputs]
    cfg["output"] = [_tensor(t.name, t.dtype, t.shape) for t in spec.outputs]
    cfg["dynamic_batching"] = {"max_queue_delay_microseconds": opts.queue_delay_us}
    gpu = opts.gpu or opts.tensorrt
    cfg["instance_group"] = [{"kind": Enum("KIND_GPU" if gpu else "KIND_CPU"), "count": opts.instances}]
    cfg["parameters"] = [_param("intra_op_thread_count", opts.threads), _param("inter_op_thread_count", 1)]
    if opts.tensorrt:
        from modrt.runtime.providers import ProviderConfig, profile_shapes

        pc = ProviderConfig(name="tensorrt", max_batch=opts.max_batch, opt_batch=min(8, opts.max_batch),
                            max_seq=opts.max_seq, opt_seq=min(35, opts.max_seq))
        params = {"precision_mode": "FP16" if opts.fp16 else "FP32", "max_workspace_size_bytes": 1 << 30,
                  "trt_engine_cache_enable": 1, "trt_engine_cache_path": f"{opts.trt_cache}/{model}",
                  "trt_timing_cache_enable": 1, "trt_timing_cache_path": opts.trt_cache,
                  **profile_shapes(spec, pc)}
        cfg["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [
            {"name": "tensorrt", "parameters": [{"key": k, "value": str(v)} for k, v in params.items()]}]}}
    return _pb(cfg)


# --- the bundle as the router sees it -------------------------------------------------


def _router_spec(m: bundle.Manifest, names: dict[str, str], opts: Options) -> dict[str, Any]:
    """router.json: the pipeline (as ``modrt.runtime.pipeline``) in model names."""
    layer_names = {l.name for l in m.layers}
    first = next(i for i, s in enumerate(m.stages) if s in layer_names)
    last = max(i for i, s in enumerate(m.stages) if s in layer_names)
    stages = []
    for i, s in enumerate(m.stages):
        if s in layer_names:
            stages.append({"kind": "layer", "name": s})
            continue
        g = m.graphs[s]
        where = "pre" if i < first else "post" if i > last else "mid"
        if m.topology == "recurrent" and where == "mid":
            raise BundleError("a recurrent bundle with graphs between its modular layers cannot be routed")
        stages.append({"kind": "graph", "model": names[s], "input": g.inputs[0].name,
                       "output": g.outputs[0].name, "where": where})

    def io(graph: str) -> dict[str, Any]:
        g = m.graphs[graph]
        return {"model": names[graph], "inputs": [t.name for t in g.inputs], "output": g.outputs[0].name}

    layers = []
    for l in m.layers:
        entry: dict[str, Any] = {"name": l.name, "modules": l.modules, "k": l.k, "combine": l.combine,
                                 "selection": l.selection, "controller": io(l.controller),
                                 "module_graphs": [io(g) for g in l.module_graphs]}
        if m.topology == "recurrent":
            if l.state is None:
                raise BundleError(f"recurrent layer {l.name} names no state input")
            entry["state"] = l.state
            entry["hidden"] = next(t.shape[-1] for t in m.graphs[l.controller].inputs if t.name == l.state)
        layers.append(entry)
    signature = _signature(m)
    spec: dict[str, Any] = {"topology": m.topology, "stages": stages, "layers": layers,
                            "input": signature.input.name, "output": signature.outputs[0].name,
                            "argmax": next((t.name for t in signature.outputs
                                            if t.name in sig.ARGMAX_OUTPUT.values()), None),
                            "threads": max(1, opts.threads)}
    if m.topology == "recurrent":
        spec["recurrent"] = opts.recurrent
        spec["vocab"] = int(signature.outputs[0].shape[-1])
    return spec


def _signature(m: bundle.Manifest) -> sig.Signature:
    """The model signature ``modrt serve`` answers with, from the manifest alone."""
    layer_names = {l.name for l in m.layers}
    first = next(s for s in m.stages if s in layer_names)
    lastl = [s for s in m.stages if s in layer_names][-1]
    pre = m.stages[:m.stages.index(first)]
    post = m.stages[m.stages.index(lastl) + 1:]
    entry = m.graphs[pre[0]] if pre else m.graphs[m.layer(first).controller]
    exit_ = m.graphs[post[-1]] if post else m.graphs[m.layer(lastl).module_graphs[0]]
    state = None
    if m.topology == "recurrent":
        state = [next(t.shape[-1] for t in m.graphs[l.controller].inputs if t.name == l.state) for l in m.layers]
    return sig.derive(m, entry.inputs[0], exit_.outputs[0], state)


def router_config(name: str, m: bundle.Manifest, opts: Options) -> str:
    s = _signature(m)
    cfg: dict[str, Any] = {"name": name, "backend": "python", "max_batch_size": opts.max_batch,
                           "input": [_tensor(t.name, t.dtype, t.shape, t.optional) for t in s.inputs],
                           "output": [_tensor(t.name, t.dtype, t.shape) for t in s.outputs],
                           "dynamic_batching": {"max_queue_delay_microseconds": opts.queue_delay_us},
                           "instance_group": [{"kind": Enum("KIND_CPU"), "count": opts.instances}]}
    return _pb(cfg)


# --- writing ----------------------------------------------------------------------------


def _prepare(repo: Path, force: bool) -> None:
    if repo.exists() and not repo.is_dir():
        raise InputError(f"{repo}: exists and is not a directory")
    if repo.is_dir() and any(repo.iterdir()):
        if not force:
            raise InputError(f"{repo}: exists and is not empty (pass --force to replace it)")
        if not (repo / MARKER).is_file():
            raise InputError(f"{repo}: not a repository modrt wrote; refusing to replace it even with --force")


def write(bundle_dir: str | os.PathLike, repo: str | os.PathLike, opts: Options | None = None,
          force: bool = False) -> dict[str, Any]:
    """Write the repository; returns {"router": name, "models": [...], "checked": n}.
    The repository is built beside ``repo`` and moved into place, so a failure leaves
    nothing half-written."""
    opts = opts or Options()
    src, repo = Path(bundle_dir), Path(repo)
    m = bundle.load(src)  # checksums, schema, graph io
    if len({l.k for l in m.layers}) != 1:
        raise BundleError(f"{src}: layers with different K cannot be routed (nor run by modrt's runtime)")
    name = opts.name or str(m.task.get("name") or "modrt")
    names = {g: f"{opts.prefix}{g}" for g in m.graphs}
    if name in names.values():
        raise InputError(f"routing model name {name!r} is also a graph's name; pass --name or --prefix")
    for n in [name, *names.values()]:
        if not n or "/" in n or n.startswith(".") or n == "kserve":
            raise InputError(f"{n!r} is not a usable Triton model name")
    _prepare(repo, force)
    tmp = repo.with_name(f".{repo.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    models = tmp / MODELS
    try:
        for graph, spec in m.graphs.items():
            d = models / names[graph]
            (d / "1").mkdir(parents=True)
            (d / "config.pbtxt").write_text(onnx_config(names[graph], spec, opts))
            shutil.copyfile(src / spec.file, d / "1" / "model.onnx")
            if opts.onnx_backend == "python":
                shutil.copyfile(HERE / "onnx_model.py", d / "1" / "model.py")
        d = models / name
        (d / "1").mkdir(parents=True)
        (d / "config.pbtxt").write_text(router_config(name, m, opts))
        (d / "1" / "router.json").write_text(json.dumps(_router_spec(m, names, opts), indent=1))
        shutil.copyfile(HERE / "router.py", d / "1" / "model.py")
        shutil.copyfile(HERE.parent / "routing.py", d / "1" / "modrt_routing.py")
        from modrt.triton import kserve

        kserve.write(tmp / "kserve", name, repo.name, src.name, opts)
        (tmp / MARKER).write_text(json.dumps({"bundle": str(src.resolve()), "router": name,
                                              "models": sorted(names.values())}, indent=1))
        checked = validate(tmp)
        if repo.exists():  # empty, or (checked above) a repository modrt wrote: replaced only now
            shutil.rmtree(repo)
        os.replace(tmp, repo)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"router": name, "models": sorted(names.values()), "checked": checked}


# --- validation ---------------------------------------------------------------------------


def models_dir(repo: str | os.PathLike) -> Path:
    """The Triton model repository of ``repo``: REPO/models when REPO is what
    ``export-triton`` wrote, else REPO itself."""
    repo = Path(repo)
    return repo / MODELS if (repo / MARKER).is_file() and (repo / MODELS).is_dir() else repo


def _model_config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return None
    return model_config_pb2


def parse(path: Path):
    """config.pbtxt -> Triton's ``ModelConfig`` (unknown fields are an error). Needs
    ``tritonclient[grpc]``."""
    from google.protobuf import text_format

    pb2 = _model_config_pb2()
    if pb2 is None:
        raise ModrtError("parsing Triton configs needs tritonclient[grpc] (pip install 'tritonclient[grpc]')")
    try:
        return text_format.Parse(path.read_text(), pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise BundleError(f"{path}: not a valid Triton ModelConfig: {exc}") from exc


def validate(repo: str | os.PathLike) -> int:
    """Check every model of ``repo``: its config parses as a ``ModelConfig`` (when
    tritonclient is installed), its name is its directory's, and an ONNX model's inputs
    and outputs (names, datatypes, dims) are its graph's. Returns how many configs parsed
    (0 without tritonclient); raises BundleError naming the first fault."""
    repo = models_dir(repo)
    pb2 = _model_config_pb2()
    parsed = 0
    for d in sorted(p for p in repo.iterdir() if p.is_dir() and (p / "config.pbtxt").is_file()):
        onnx_file = d / "1" / "model.onnx"
        if pb2 is None:
            continue
        cfg = parse(d / "config.pbtxt")
        parsed += 1
        if cfg.name != d.name:
            raise BundleError(f"{d}: config names the model {cfg.name!r}, its directory is {d.name!r}")
        if not onnx_file.is_file():
            continue
        inputs, outputs = bundle._read_io(onnx_file)
        for kind, want, have in (("input", inputs, cfg.input), ("output", outputs, cfg.output)):
            got = {t.name: (pb2.DataType.Name(t.data_type), list(t.reshape.shape) if t.HasField("reshape")
                            else list(t.dims)) for t in have}
            exp = {t.name: (DATATYPES[t.dtype], list(t.shape[1:])) for t in want}
            if got != exp:
                raise BundleError(f"{d.name}: config {kind}s {got} differ from the ONNX graph's {exp}")
    return parsed


__all__ = ["Options", "write", "validate", "parse", "onnx_config", "router_config", "DATATYPES",
           "RECURRENT_MODES", "ONNX_BACKENDS", "models_dir", "MODELS"]
