"""``modrt export CKPT OUT/``: checkpoint -> manifest.json + one ONNX file per graph.

Steps: load and check the checkpoint, rebuild the model from its config alone, export
every graph (progress bar), check each graph against its PyTorch module under ONNX
Runtime, write the manifest, then measure model-level parity on real validation text
(PyTorch vs the routed runtime vs the dense graphs) and record it in the manifest.
Export fails with one line if parity is out of tolerance.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from modrt import bundle
from modrt._exceptions import ExportError
from modrt.export import graphs as G
from modrt.train import checkpoint
from modrt.train.model import ModularLM, greedy_policy

GRAPH_ATOL = 1e-4  # per graph, on its sample input
PPL_RTOL = 1e-3  # model level: perplexity, PyTorch vs ONNX Runtime (routed and dense)
# Images: accuracy, PyTorch vs ONNX Runtime; a near-tie of a controller or of the classes may
# flip in float32 (different kernels), so a few images in a thousand may differ.
ACC_ATOL = 3e-3
IMAGE_INPUTS = ("image", "pixels")  # what an image bundle takes: normalised floats, or raw uint8 pixels


def _prepare_out(out: Path, force: bool) -> None:
    if bundle.prepare_output(out, force, ExportError):
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"{out}: cannot create ({exc.strerror or exc})") from exc


def _graph_parity(g: G.GraphDef, data: bytes) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = g.module(*g.args)
    want = want if isinstance(want, tuple) else (want,)
    got = sess.run(None, {n: a.numpy() for n, a in zip(g.inputs, g.args, strict=True)})
    diff = 0.0
    for w, o in zip(want, got, strict=True):
        if w.dtype.is_floating_point:
            diff = max(diff, float(np.abs(w.numpy() - o).max()))
        elif not np.array_equal(w.numpy(), o):
            return math.inf
    return diff


def _onnx_of(g) -> tuple[bytes, float]:
    try:
        raw = G.to_onnx(g)
    except Exception as exc:  # torch.onnx raises many kinds; name the graph
        raise ExportError(f"graph {g.name}: ONNX export failed ({type(exc).__name__}: {str(exc)[:200]})") from exc
    diff = _graph_parity(g, raw)
    if not diff <= GRAPH_ATOL:
        raise ExportError(f"graph {g.name}: ONNX Runtime differs from PyTorch by {diff:.3g} (tolerance {GRAPH_ATOL})")
    return raw, diff


def export_only(ckpt_path: str | Path, out: str | Path, name: str) -> list[str]:
    """Re-export graph ``name`` from a checkpoint into the existing bundle ``out`` (with the
    dense baseline of its layer, which holds every module and the controller). Every other
    graph must be what this checkpoint exports, byte for byte (the export is deterministic:
    each is exported again and its sha256 compared with the manifest's), so the bundle
    never mixes two models. Each graph goes in as ``modrt bundle replace`` puts one
    (atomically; parity marked stale). Returns the graphs written."""
    import tempfile

    from modrt.bundle_cli import replace_graph

    out = Path(out)
    m = bundle.load(out)
    model, _ = checkpoint.load_model(ckpt_path)
    defs = {g.name: g for g in G.defs_of(model, pixels="pixels" in m.stages)}
    if name not in defs or name not in m.graphs:
        raise ExportError(f"no graph {name!r} to export; the bundle has {', '.join(sorted(m.graphs))}")
    todo = [name]
    for layer in m.layers:
        if name in (layer.controller, *layer.module_graphs) and layer.name in m.dense:
            todo.append(m.dense[layer.name])  # it holds the changed parameters too
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {}
        for n, g in defs.items():
            raw = G.to_onnx(g) if n not in todo else _onnx_of(g)[0]
            fresh[n] = Path(tmp) / f"{n}.onnx"
            fresh[n].write_bytes(raw)
        differ = [n for n in defs if n not in todo and bundle.sha256_file(fresh[n]) != m.graphs[n].sha256]
        if differ:
            raise ExportError(f"{out}: graph(s) {', '.join(differ)} are not what {ckpt_path} exports: --only would "
                              "mix two models; export the whole bundle")
        for n in todo:
            replace_graph(out, n, fresh[n])
    return todo


def export(ckpt_path: str | Path, out: str | Path, force: bool = False, progress: bool = True,
           data: str | Path | None = None, parity_tokens: int = 2000, parity_images: int = 1000,
           image_input: str = "image") -> bundle.Manifest:
    """``image_input`` (CIFAR-10): "image", the normalised float (B, 3, H, W) picture, or
    "pixels", raw uint8 (B, H, W, 3) RGB normalised by the bundle's first graph."""
    out = Path(out)
    if image_input not in IMAGE_INPUTS:
        raise ExportError(f"image input {image_input!r} unknown; choose one of {IMAGE_INPUTS}")
    model, ckpt = checkpoint.load_model(ckpt_path)
    if not model.cfg.exportable:
        raise ExportError(f"{ckpt_path}: a {model.cfg.method}-routed model is a training baseline; the bundle "
                          "format holds controllers of [e_t; h] (export em, reinforce, noisy-topk or dense)")
    cfg = model.cfg
    if cfg.task not in ("ptb", "cifar10"):
        raise ExportError(f"{ckpt_path}: task {cfg.task!r} has no exporter yet")
    _prepare_out(out, force)
    specs: dict[str, bundle.GraphSpec] = {}
    graph_diff: dict[str, float] = {}
    pixels = image_input == "pixels"
    if pixels and cfg.task != "cifar10":
        raise ExportError(f"{ckpt_path}: --image-input pixels is for image models; this one is {cfg.task}")
    for g in tqdm(list(G.defs_of(model, pixels)), desc="export", unit="graph", disable=not progress):
        raw, graph_diff[g.name] = _onnx_of(g)
        path = out / f"{g.name}.onnx"
        path.write_bytes(raw)
        specs[g.name] = bundle.graph_spec_from_onnx(path)
    trained = {"trained_steps": ckpt.get("step"), "trained_epochs": ckpt.get("epoch")}
    if cfg.task == "cifar10":
        manifest = _image_manifest(cfg, ckpt, specs, graph_diff, trained, pixels)
    else:
        layer = bundle.LayerSpec(
            name="layer0", modules=cfg.modules, k=cfg.k, combine=cfg.combine,
            controller="layer0.controller",
            module_graphs=tuple(f"layer0.module{m}" for m in range(cfg.modules)), state="h",
            selection=cfg.selection)
        manifest = bundle.Manifest(
            task={"name": "ptb", "kind": "language-model", "vocab": list(ckpt["vocab"]),
                  "eos": "<eos>", "unk": "<unk>", "hidden": cfg.hidden, "embedding": cfg.embedding},
            topology="recurrent",
            stages=("embedding", "layer0", "head"),
            layers=(layer,),
            dense={"layer0": "layer0.dense"},
            graphs=specs,
            opset=G.OPSET,
            model={**ckpt["model_config"], **trained},
            parity={"graphs_max_abs_diff": graph_diff},
        )
    bundle.write(out, manifest)
    if cfg.task == "cifar10":
        parity = measure_image_parity(model, out, data=data, images=parity_images)
        ok = parity["acc_abs_diff_routed"] <= ACC_ATOL and parity["acc_abs_diff_dense"] <= ACC_ATOL
        what = (f"accuracy torch {parity['acc_torch']:.4f}, routed {parity['acc_routed']:.4f}, dense "
                f"{parity['acc_dense']:.4f} (atol {ACC_ATOL})")
    else:
        parity = measure_parity(model, out, ckpt["vocab"], data=data, tokens=parity_tokens)
        # "not <=" so that a NaN (a model that overflows) fails too.
        ok = parity["ppl_rel_diff_routed"] <= PPL_RTOL and parity["ppl_rel_diff_dense"] <= PPL_RTOL
        what = (f"perplexity torch {parity['ppl_torch']:.4f}, routed {parity['ppl_routed']:.4f}, dense "
                f"{parity['ppl_dense']:.4f} (rtol {PPL_RTOL})")
    manifest = replace(manifest, parity={**manifest.parity, **parity})
    bundle.write(out, manifest)
    if not ok:
        raise ExportError(f"{out}: parity out of tolerance: {what}")
    return manifest


def _image_manifest(cfg, ckpt: dict[str, Any], specs: dict[str, bundle.GraphSpec], graph_diff: dict[str, float],
                    trained: dict[str, Any], pixels: bool = False) -> bundle.Manifest:
    """The manifest of an image network: feed-forward, its layers with the pools between
    them, the head; the task records the input picture, its normalisation and the classes."""
    layers = tuple(bundle.LayerSpec(
        name=f"layer{li}", modules=cfg.modules, k=cfg.k, combine=cfg.combine, controller=f"layer{li}.controller",
        module_graphs=tuple(f"layer{li}.module{m}" for m in range(cfg.modules)), selection=cfg.selection)
        for li in range(cfg.layers))
    return bundle.Manifest(
        task={"name": "cifar10", "kind": "classification", "classes": list(ckpt["classes"]),
              "image": {"input": "pixels" if pixels else "image", "layout": "NHWC" if pixels else "NCHW",
                        "dtype": "uint8" if pixels else "float32", "channels": cfg.in_channels,
                        "height": cfg.image, "width": cfg.image, "mean": list(cfg.mean), "std": list(cfg.std),
                        "normalisation": ("done by the bundle (graph 'pixels'): " if pixels else "")
                        + "image = (pixels / 255 - mean) / std per channel; pixels uint8 HWC RGB"}},
        topology="feedforward",
        stages=G.image_stages(cfg.layers, pixels),
        layers=layers,
        dense={l.name: f"{l.name}.dense" for l in layers},
        graphs=specs,
        opset=G.OPSET,
        model={**ckpt["model_config"], **trained},
        parity={"graphs_max_abs_diff": graph_diff},
    )


def measure_image_parity(model, out: Path, data: str | Path | None, images: int, batch: int = 50) -> dict[str, Any]:
    """PyTorch vs ONNX Runtime (routed and dense) on the first ``images`` CIFAR-10 test images:
    accuracy of each, max |logit diff|, and how often the routing agrees (every layer)."""
    import modrt
    from modrt.data import cifar10


    ds = cifar10.load(data)
    # Evenly spaced over the test set: a copy stored class by class (the JPEG folders) would
    # otherwise give images of one class only.
    pick = np.linspace(0, len(ds.test_labels) - 1, min(images, len(ds.test_labels))).astype(np.int64)
    pixels, labels = ds.test_images[pick], ds.test_labels[pick]
    x_all = cifar10.normalise(pixels, model.cfg.mean, model.cfg.std)
    rt = modrt.load(out, provider="cpu")
    raw = rt.input.name == "pixels"  # the bundle normalises: feed it the pixels themselves
    correct = {"torch": 0, "routed": 0, "dense": 0}
    max_diff = {"routed": 0.0, "dense": 0.0}
    agree = 0
    for lo in range(0, len(labels), batch):
        x, y = x_all[lo:lo + batch], labels[lo:lo + batch]
        with torch.no_grad():
            o = model(torch.from_numpy(x), greedy_policy())
        lt = o.logits.numpy()
        feed = {"pixels": pixels[lo:lo + batch]} if raw else {"image": x}
        r, d = rt.run(**feed), rt.run_dense(**feed)
        for name, logits in (("torch", lt), ("routed", r["logits"]), ("dense", d["logits"])):
            correct[name] += int((logits.argmax(1) == y).sum())
        max_diff["routed"] = max(max_diff["routed"], float(np.abs(r["logits"] - lt).max()))
        max_diff["dense"] = max(max_diff["dense"], float(np.abs(d["logits"] - lt).max()))
        agree += int((r["modules"] == o.a.permute(1, 0, 2).numpy()).all((1, 2)).sum())
    n = len(labels)
    acc = {k: v / n for k, v in correct.items()}
    return {
        "data": f"cifar10 test, {n} images evenly spaced", "images": n, "acc_torch": acc["torch"],
        "acc_routed": acc["routed"],
        "acc_dense": acc["dense"], "acc_abs_diff_routed": abs(acc["routed"] - acc["torch"]),
        "acc_abs_diff_dense": abs(acc["dense"] - acc["torch"]),
        "logits_max_abs_diff_routed": max_diff["routed"], "logits_max_abs_diff_dense": max_diff["dense"],
        "routing_agreement": agree / n,
    }


def measure_parity(model: ModularLM, out: Path, vocab: list[str], data: str | Path | None,
                   tokens: int, batch: int = 4, bptt: int = 35) -> dict[str, Any]:
    """PyTorch vs ONNX Runtime (routed and dense) on the first validation tokens."""
    import modrt
    from modrt.data import ptb
    from modrt.evaluate import _nll, parity_streams

    corpus = ptb.load(data)
    if list(corpus.vocab) != list(vocab):
        raise ExportError("the checkpoint's vocabulary differs from this Penn Treebank copy's")
    x, y = parity_streams(np.asarray(corpus.valid), tokens, batch, bptt)  # (B, N) streams
    rt = modrt.load(out, provider="cpu")
    h_t = model.init_hidden(batch)
    h_r = h_d = None
    nll = {"torch": [], "routed": [], "dense": []}
    max_diff = {"routed": 0.0, "dense": 0.0}
    agree = total = 0
    for lo in range(0, x.shape[1], bptt):
        xb, yb = x[:, lo : lo + bptt], y[:, lo : lo + bptt]
        with torch.no_grad():
            o = model(torch.from_numpy(xb).T.contiguous(), h_t, greedy_policy())
            lt = model.head(o.hs).transpose(0, 1).numpy()  # (B, T, V)
            h_t = o.h_last
        r = rt.run(tokens=xb, h=h_r)
        d = rt.run_dense(tokens=xb, h=h_d)
        h_r, h_d = r["h_last"], d["h_last"]
        nll["torch"].append(_nll(lt, yb))
        nll["routed"].append(_nll(r["logits"], yb))
        nll["dense"].append(_nll(d["logits"], yb))
        max_diff["routed"] = max(max_diff["routed"], float(np.abs(r["logits"] - lt).max()))
        max_diff["dense"] = max(max_diff["dense"], float(np.abs(d["logits"] - lt).max()))
        sel = o.a.permute(1, 0, 2).numpy()  # (B, T, K)
        agree += int((r["modules"][:, :, 0, :] == sel).all(-1).sum())
        total += sel.shape[0] * sel.shape[1]
    ppl = {k: float(np.exp(np.concatenate(v, 1).mean())) for k, v in nll.items()}
    return {
        "data": "ptb.valid.txt", "tokens": int(x.size), "parity_tokens": tokens, "batch": batch, "bptt": bptt,
        "ppl_torch": ppl["torch"], "ppl_routed": ppl["routed"], "ppl_dense": ppl["dense"],
        "ppl_rel_diff_routed": abs(ppl["routed"] - ppl["torch"]) / ppl["torch"],
        "ppl_rel_diff_dense": abs(ppl["dense"] - ppl["torch"]) / ppl["torch"],
        "logits_max_abs_diff_routed": max_diff["routed"],
        "logits_max_abs_diff_dense": max_diff["dense"],
        "routing_agreement": agree / max(total, 1),
    }

