"""The bundle: ``manifest.json`` plus one ONNX file per graph (DESIGN.md §5).

The manifest is the only thing the runtime reads first; this module is its schema and
its validating loader. Everything is torch-free.

    {
      "format": "modrt-bundle", "schema_version": 1, "modrt_version": "0.1.0",
      "opset": 17,
      "task": {"name": "ptb", "kind": "language-model", "vocab": [...], "eos": "<eos>",
               "unk": "<unk>"}                                      # or kind "synthetic"
      "model": {...}                                                # asdict(ModelConfig)
      "topology": "recurrent" | "feedforward",
      "stages": ["embedding", "layer0", "head"],                    # graph or layer names
      "layers": [{"name": "layer0", "modules": M, "k": K, "combine": "sum",
                  "selection": "slots",                             # or "topk"
                  "controller": "layer0.controller",
                  "module_graphs": ["layer0.module0", ...],
                  "state": "h" | null}],                            # recurrent state name
      "dense": {"layer0": "layer0.dense"},                          # dense step per layer
      "graphs": {"<name>": {"file": "<name>.onnx", "sha256": "...",
                            "inputs":  [{"name": "e", "dtype": "float32", "shape": [-1, 128]}],
                            "outputs": [...]}},
      "parity": {...}                                               # measured at export
    }

Graph contracts (batch is -1, dynamic, everywhere; R = rows routed to a module):

    recurrent (PTB)
      embedding          tokens int64 [B, T]            -> emb float32 [B, T, E]
      <layer>.controller e [B, E], h [B, H]             -> log_probs float32 [B, K, M]
                                                           ([B, 1, M] for selection "topk")
      <layer>.module<m>  e [R, E], h [R, H]             -> h_new float32 [R, H]
      <layer>.dense      e [B, E], h [B, H]             -> h_new [B, H], selection int64 [B, K]
      head               hs float32 [B, T, H]           -> logits float32 [B, T, V]
    feedforward
      <layer>.controller x [B, D]                       -> log_probs float32 [B, K, M]
      <layer>.module<m>  x [R, D]                       -> y float32 [R, D_out]
      <layer>.dense      x [B, D]                       -> y [B, D_out], selection int64 [B, K]
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modrt._exceptions import BundleError
from modrt._version import __version__

FORMAT = "modrt-bundle"
SCHEMA_VERSION = 1
TOPOLOGIES = ("recurrent", "feedforward")
COMBINE_RULES = ("sum", "mean", "gate")
SELECTIONS = ("slots", "topk")

# ONNX TensorProto element types <-> manifest dtype names. Unknown keys raise KeyError.
ONNX_DTYPES: dict[int, str] = {1: "float32", 2: "uint8", 6: "int32", 7: "int64", 10: "float16", 9: "bool"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, int64, ...
    shape: tuple[int, ...]  # -1 for a dynamic dimension (batch always)

    def __post_init__(self) -> None:
        if self.dtype not in ONNX_DTYPES.values():
            raise ValueError(f"dtype {self.dtype!r} unknown; allowed {sorted(ONNX_DTYPES.values())}")


PRECISIONS = ("float32", "int8")


@dataclass(frozen=True)
class GraphSpec:
    file: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # The precision of the graph's weights: "float32", or "int8" (``modrt quantize``: dynamic
    # int8 MatMul weights, activations quantised per call; inputs and outputs stay float32).
    precision: str = "float32"


@dataclass(frozen=True)
class LayerSpec:
    name: str
    modules: int  # M
    k: int  # K slots ("slots") or modules kept ("topk")
    # sum | mean over the distinct selected modules; gate: weighted by the controller's
    # probabilities of the selected modules, renormalised over them (noisy top-k)
    combine: str
    controller: str  # graph name
    module_graphs: tuple[str, ...]  # M graph names
    state: str | None = None  # recurrent state input/output name, None for feed-forward
    # slots: the controller gives K softmaxes, the argmax of each is picked (EM, REINFORCE);
    # topk: it gives one softmax [B, 1, M] and its k most probable modules are picked.
    selection: str = "slots"

    def __post_init__(self) -> None:
        if self.combine not in COMBINE_RULES:
            raise ValueError(f"combine {self.combine!r} unknown; allowed {COMBINE_RULES}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection {self.selection!r} unknown; allowed {SELECTIONS}")
        if self.combine == "gate" and self.selection != "topk":
            raise ValueError(f"layer {self.name}: combine 'gate' needs selection 'topk'")
        if not 1 <= self.k <= self.modules:
            raise ValueError(f"layer {self.name}: need 1 <= k ({self.k}) <= modules ({self.modules})")
        if len(self.module_graphs) != self.modules:
            raise ValueError(f"layer {self.name}: {len(self.module_graphs)} module graphs for {self.modules} modules")


@dataclass(frozen=True)
class Manifest:
    task: dict[str, Any]
    topology: str
    stages: tuple[str, ...]
    layers: tuple[LayerSpec, ...]
    dense: dict[str, str]  # layer name -> dense graph name
    graphs: dict[str, GraphSpec]
    opset: int
    model: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    schema_version: int = SCHEMA_VERSION
    modrt_version: str = __version__

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"topology {self.topology!r} unknown; allowed {TOPOLOGIES}")
        names = set(self.graphs)
        for layer in self.layers:
            for g in (layer.controller, *layer.module_graphs, self.dense.get(layer.name, layer.controller)):
                if g not in names:
                    raise ValueError(f"layer {layer.name} names graph {g!r}, which the manifest lacks")
        layer_names = {l.name for l in self.layers}
        for s in self.stages:
            if s not in names and s not in layer_names:
                raise ValueError(f"stage {s!r} is neither a graph nor a layer")

    def layer(self, name: str) -> LayerSpec:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        d = dict(d)
        d["graphs"] = {
            n: GraphSpec(
                file=g["file"], sha256=g["sha256"],
                inputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in g["inputs"]),
                outputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in g["outputs"]),
                precision=g.get("precision", "float32"),
            )
            for n, g in d["graphs"].items()
        }
        d["layers"] = tuple(LayerSpec(**{**l, "module_graphs": tuple(l["module_graphs"])}) for l in d["layers"])
        d["stages"] = tuple(d["stages"])
        return cls(**d)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def graph_spec_from_onnx(path: str | os.PathLike) -> GraphSpec:
    """Describe an ONNX file as the manifest does (names, dtypes, shapes, sha256)."""
    inputs, outputs = _read_io(Path(path))
    return GraphSpec(file=Path(path).name, sha256=sha256_file(path), inputs=inputs, outputs=outputs)


def _read_io(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The graph's inputs and outputs; parses the file once. BundleError if not ONNX."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not ONNX"
        raise BundleError(f"{path}: not an ONNX model ({type(exc).__name__})") from exc
    return (tuple(_specs(model.graph.input, model.graph.initializer)),
            tuple(_specs(model.graph.output, ())))


def _specs(values, initializers) -> list[TensorSpec]:
    init = {i.name for i in initializers}
    out = []
    for v in values:
        if v.name in init:
            continue
        t = v.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        try:
            dtype = ONNX_DTYPES[t.elem_type]
        except KeyError as exc:
            raise BundleError(f"tensor {v.name}: ONNX element type {t.elem_type} not supported") from exc
        out.append(TensorSpec(v.name, dtype, shape))
    return out


def save_graphs(directory: str | os.PathLike, graphs: dict[str, Any]) -> dict[str, GraphSpec]:
    """Save ONNX ModelProtos as ``<name>.onnx`` and describe each as the manifest does."""
    import onnx

    specs = {}
    for name, model in graphs.items():
        path = Path(directory) / f"{name}.onnx"
        onnx.save(model, str(path))
        specs[name] = graph_spec_from_onnx(path)
    return specs


def prepare_output(out: str | os.PathLike, force: bool, error: type[Exception] = BundleError) -> bool:
    """Check that ``out`` may receive a bundle: absent, an empty directory, or (with
    ``force``) a directory holding a bundle, never anything else. Raises ``error`` (one
    line). Returns whether a bundle is there to be replaced."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise error(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise error(f"{out}: exists and is not empty (pass --force to replace it)")
        if not (out / "manifest.json").is_file():
            raise error(f"{out}: not a modrt bundle; refusing to replace it even with --force")
        return True
    return False


def write(directory: str | os.PathLike, manifest: Manifest) -> Path:
    path = Path(directory) / "manifest.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=1))
    os.replace(tmp, path)
    return path


def load(directory: str | os.PathLike, verify: bool = True) -> Manifest:
    """Read and validate a bundle; any fault is one ``BundleError`` naming the file.

    Checks: manifest present and parseable, format and schema version, every graph file
    inside the bundle directory, present, with the recorded sha256, and (``verify``) its
    inputs/outputs matching the manifest's names, dtypes and shapes.
    """
    root = Path(directory)
    mpath = root / "manifest.json"
    if root.is_file():
        hint = (" (a training checkpoint: make a bundle with `modrt export CKPT OUT/` first)"
                if root.suffix in (".pt", ".pth", ".ckpt") else "")
        raise BundleError(f"{root}: a file, not a bundle directory{hint}")
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle directory")
    if not mpath.is_file():
        raise BundleError(f"{mpath}: missing (not a modrt bundle; make one with `modrt export`)")
    try:
        raw = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{mpath}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BundleError(f"{mpath}: not a modrt bundle manifest (format must be '{FORMAT}')")
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(
            f"{mpath}: schema version {raw.get('schema_version')!r} unknown; this modrt "
            f"({__version__}) reads version {SCHEMA_VERSION}"
        )
    check_types(raw, mpath)
    try:
        manifest = Manifest.from_json(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{mpath}: invalid manifest ({type(exc).__name__}: {exc})") from exc
    resolved_root = root.resolve()
    for name, g in manifest.graphs.items():
        path = (root / g.file).resolve()
        if resolved_root not in path.parents:
            raise BundleError(f"{mpath}: graph {name!r} file {g.file!r} leaves the bundle directory")
        if not path.is_file():
            raise BundleError(f"{root / g.file}: missing (graph {name!r} of the manifest)")
        got = sha256_file(path)
        if got != g.sha256:
            raise BundleError(
                f"{root / g.file}: wrong checksum (sha256 {got[:12]}..., manifest says {g.sha256[:12]}...)")
        if verify:
            inputs, outputs = _read_io(path)
            for kind, want, have in (("input", g.inputs, inputs), ("output", g.outputs, outputs)):
                if [t.name for t in want] != [t.name for t in have]:
                    raise BundleError(
                        f"{root / g.file}: {kind}s {[t.name for t in have]}, "
                        f"manifest says {[t.name for t in want]}")
                for w, h in zip(want, have, strict=True):
                    if w.dtype != h.dtype or not _shapes_agree(w.shape, h.shape):
                        raise BundleError(
                            f"{root / g.file}: {kind} {w.name!r} is {h.dtype}{list(h.shape)}, "
                            f"manifest says {w.dtype}{list(w.shape)}")
    return manifest


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_types(raw: dict[str, Any], mpath: Path) -> None:
    """The manifest's JSON types, strictly (a hand-edited manifest): one BundleError naming
    the field and what it must be, before any dataclass sees it."""
    def fail(where: str, must: str, got: Any) -> None:
        raise BundleError(f"{mpath}: {where} must be {must}, got {json.dumps(got)[:60]}")

    def need(obj: Any, key: str, where: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise BundleError(f"{mpath}: {where} has no {key!r}")
        return obj[key]

    def strs(v: Any, where: str, nonempty: bool = True) -> None:
        if not isinstance(v, list) or (nonempty and not v) or not all(isinstance(x, str) for x in v):
            fail(where, "a non-empty list of strings" if nonempty else "a list of strings", v)

    if not isinstance(need(raw, "task", "the manifest"), dict):
        fail("task", "an object", raw["task"])
    if not isinstance(need(raw, "topology", "the manifest"), str):
        fail("topology", "a string", raw["topology"])
    if not _is_int(need(raw, "opset", "the manifest")):
        fail("opset", "an integer", raw["opset"])
    strs(need(raw, "stages", "the manifest"), "stages")
    graphs = need(raw, "graphs", "the manifest")
    if not isinstance(graphs, dict) or not graphs:
        fail("graphs", "a non-empty object (graph name -> file, sha256, inputs, outputs)", graphs)
    for name, g in graphs.items():
        w = f"graphs.{name}"
        if not isinstance(g, dict):
            fail(w, "an object", g)
        for key in ("file", "sha256"):
            if not isinstance(need(g, key, w), str):
                fail(f"{w}.{key}", "a string", g[key])
        if g.get("precision", "float32") not in PRECISIONS:
            fail(f"{w}.precision", f"one of {list(PRECISIONS)}", g["precision"])
        for key in ("inputs", "outputs"):
            ts = need(g, key, w)
            if not isinstance(ts, list) or not ts:
                fail(f"{w}.{key}", "a non-empty list of tensors", ts)
            for i, t in enumerate(ts):
                tw = f"{w}.{key}[{i}]"
                for f in ("name", "dtype"):
                    if not isinstance(need(t, f, tw), str):
                        fail(f"{tw}.{f}", "a string", t[f])
                shape = need(t, "shape", tw)
                if not isinstance(shape, list) or not all(_is_int(d) and d >= -1 for d in shape):
                    fail(f"{tw}.shape", "a list of integers (-1: any size)", shape)
    layers = need(raw, "layers", "the manifest")
    if not isinstance(layers, list) or not layers:
        fail("layers", "a non-empty list of layers", layers)
    for i, l in enumerate(layers):
        w = f"layers[{i}]"
        for key in ("name", "combine", "controller"):
            if not isinstance(need(l, key, w), str):
                fail(f"{w}.{key}", "a string", l[key])
        for key in ("modules", "k"):
            if not _is_int(need(l, key, w)) or l[key] < 1:
                fail(f"{w}.{key}", "a positive integer", l[key])
        strs(need(l, "module_graphs", w), f"{w}.module_graphs")
        for key in ("state", "selection"):
            if l.get(key) is not None and not isinstance(l[key], str):
                fail(f"{w}.{key}", "a string", l[key])
    dense = need(raw, "dense", "the manifest")
    if not isinstance(dense, dict) or not all(isinstance(v, str) for v in dense.values()):
        fail("dense", "an object (layer name -> graph name)", dense)
    for key in ("model", "parity"):
        if key in raw and not isinstance(raw[key], dict):
            fail(key, "an object", raw[key])


def _shapes_agree(want: tuple[int, ...], have: tuple[int, ...]) -> bool:
    return len(want) == len(have) and all(w == h or w == -1 or h == -1 for w, h in zip(want, have, strict=True))
