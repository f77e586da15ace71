"""``modrt eval OUT/``: perplexity of a PTB bundle, or accuracy of an image bundle, on a
split, from the bundle alone.

Torch-free. PTB: streams and windows as in training's evaluation (batchify into B streams,
BPTT windows, state carried across windows); CIFAR-10: every image of the split, clean,
normalised as the bundle records. Either way the figure equals the PyTorch one for the
same checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from modrt._cli_types import PROVIDER
from modrt._exceptions import BundleError


def _nll(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-token negative log-likelihood. (..., V), (...) -> (...)."""
    m = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
    return lse - np.take_along_axis(logits, y[..., None], -1)[..., 0]


def perplexity(model, tokens: np.ndarray, batch: int = 10, bptt: int = 35, dense: bool = False,
               progress: bool = False) -> dict[str, Any]:
    """Mean nll and perplexity of token ids (N,) under a loaded recurrent bundle."""
    from tqdm import tqdm

    n = len(tokens) // batch
    streams = tokens[: n * batch].reshape(batch, n)  # (B, n): row b is the b-th slice
    run = model.run_dense if dense else model.run
    total, count, h = 0.0, 0, None
    layer = model.manifest.layers[0]
    usage = np.zeros(layer.modules, dtype=np.int64)
    start = time.perf_counter()
    for i in tqdm(range(0, n - 1, bptt), desc="eval", unit="window", disable=not progress):
        t = min(bptt, n - 1 - i)
        x, y = streams[:, i : i + t], streams[:, i + 1 : i + 1 + t]
        out = run(tokens=np.ascontiguousarray(x), h=h)
        h = out["h_last"]
        total += float(_nll(out["logits"], y).sum())
        count += y.size
        usage += np.bincount(out["modules"].reshape(-1), minlength=layer.modules)
    nll = total / count
    return {"nll": nll, "ppl": float(np.exp(nll)), "tokens": count, "seconds": time.perf_counter() - start,
            "module_usage": usage.tolist(), "modules_in_use": int((usage > 0).sum())}


def parity_streams(ids: np.ndarray, tokens: int, batch: int = 4, bptt: int = 35) -> tuple[np.ndarray, np.ndarray]:
    """The export's parity text: the first ``tokens`` + 1 ids as ``batch`` streams, cut to
    whole ``bptt`` windows. -> inputs x and targets y, (batch, N) each."""
    text = ids[: tokens + 1]
    n = (len(text) - 1) // batch
    x = text[: n * batch].reshape(batch, n)
    y = text[1: n * batch + 1].reshape(batch, n)
    w = (n // bptt) * bptt
    return x[:, :w], y[:, :w]


def stream_ppl(model, x: np.ndarray, y: np.ndarray, bptt: int = 35, dense: bool = False) -> float:
    """Perplexity of targets y under a recurrent bundle fed x window by window, the state
    carried (the export's parity protocol)."""
    run = model.run_dense if dense else model.run
    h, nll = None, []
    for lo in range(0, x.shape[1], bptt):
        out = run(tokens=np.ascontiguousarray(x[:, lo: lo + bptt]), h=h)
        h = out["h_last"]
        nll.append(_nll(out["logits"], y[:, lo: lo + bptt]))
    return float(np.exp(np.concatenate(nll, 1).mean()))


def probe_feeds(model, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of a bundle's signature for comparing two runs of it (routed and dense,
    float and int8): (8, 35) token ids of its vocabulary, or 256 rows of N(0, 1) features
    (of raw pixels, for a bundle that takes them)."""
    rng = np.random.default_rng(seed)
    t = model.signature.input
    if model.topology == "recurrent":
        return {t.name: rng.integers(0, t.bounds[1], (8, 35))}
    from modrt.runtime.signature import random_rows

    return {t.name: random_rows(t, 256, rng)}


def split_ids(manifest, split: str, data: str | Path | None) -> np.ndarray:
    """A PTB split as ids of the bundle's vocabulary (unknown words -> <unk>)."""
    from modrt.data import ptb

    task = manifest.task
    if task.get("name") != "ptb":
        raise BundleError(f"bundle task {task.get('name')!r}: `modrt eval` knows Penn Treebank bundles")
    corpus = ptb.load(data)
    vocab = task["vocab"]
    index = {w: i for i, w in enumerate(vocab)}
    unk = index.get(task.get("unk", "<unk>"), 0)
    lookup = np.array([index.get(w, unk) for w in corpus.vocab], dtype=np.int64)
    return lookup[corpus.split(split)]


def accuracy(model, pixels: np.ndarray, labels: np.ndarray, batch: int = 100, dense: bool = False,
             progress: bool = False) -> dict[str, Any]:
    """Accuracy of an image bundle on uint8 (N, H, W, 3) pixels, normalised as its manifest
    says; module use per layer under its routing."""
    from tqdm import tqdm

    from modrt.data.cifar10 import normalise

    image = model.manifest.task["image"]
    raw = model.input.name == "pixels"  # the bundle normalises (modrt export --image-input pixels)
    run = model.run_dense if dense else model.run
    M = max(l.modules for l in model.manifest.layers)
    usage = np.zeros((len(model.manifest.layers), M), np.int64)
    correct = 0
    t0 = time.perf_counter()
    for lo in tqdm(range(0, len(labels), batch), desc="eval", unit="batch", disable=not progress):
        p = pixels[lo:lo + batch]
        out = run(pixels=p) if raw else run(image=normalise(p, image["mean"], image["std"]))
        correct += int((out["label"] == labels[lo:lo + batch]).sum())
        for li in range(usage.shape[0]):
            usage[li] += np.bincount(out["modules"][:, li].ravel(), minlength=M)
    p = usage / usage.sum(1, keepdims=True)
    ent = np.exp(-(p * np.log(np.clip(p, 1e-12, None))).sum(1))
    return {"acc": correct / len(labels), "images": int(len(labels)), "seconds": time.perf_counter() - t0,
            "modules_in_use": float((usage > 0).sum(1).mean()), "usage_exp_entropy": float(ent.mean()),
            "module_usage": usage.tolist()}


@click.command("eval", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle_dir", metavar="OUT", type=click.Path(path_type=Path))
@click.option("--split", type=click.Choice(["train", "valid", "test"]), default="test", show_default=True)
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Penn Treebank directory, or CIFAR-10 (a directory or tarball), as the bundle's task needs "
                   "(default: as `modrt train`).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="PTB: parallel streams (10, the standard for PTB evaluation). Images: images per call (100).")
@click.option("--bptt", type=click.IntRange(min=1), default=35, show_default=True, help="Window length.")
@click.option("--dense", is_flag=True, help="Run the dense baseline graph instead of routing.")
@click.option("--provider", type=PROVIDER, default="auto", show_default=True,
              help="ONNX Runtime execution provider; auto: TensorRT, then CUDA, then CPU.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def eval_command(bundle_dir: Path, split: str, data: Path | None, batch_size: int, bptt: int,
                 dense: bool, provider: str, as_json: bool, quiet: bool) -> None:
    """Perplexity (PTB) or accuracy (CIFAR-10) of the bundle in OUT on a split, without torch."""
    import modrt

    model = modrt.load(bundle_dir, provider=provider)
    if model.manifest.task.get("name") == "cifar10":
        from modrt.data import cifar10

        if split == "valid":
            raise click.UsageError("CIFAR-10 has no valid split; choose --split test or train")
        pixels, labels = cifar10.load(data).split(split)
        res = accuracy(model, pixels, labels, batch=batch_size or 100, dense=dense,
                       progress=not quiet and not as_json)
    else:
        ids = split_ids(model.manifest, split, data)
        res = perplexity(model, ids, batch=batch_size or 10, bptt=bptt, dense=dense,
                         progress=not quiet and not as_json)
    res.update(split=split, path="dense" if dense else "routed", provider=model.provider, bundle=str(bundle_dir))
    if as_json:
        click.echo(json.dumps(res))
        return
    M = model.manifest.layers[0].modules
    if "acc" in res:
        click.echo(f"{split} accuracy {res['acc']:.4f} ({res['images']:,} images, {res['path']}, {model.provider}, "
                   f"{res['seconds']:.1f} s); modules in use {res['modules_in_use']:.2f}/{M} per layer "
                   f"(usage exp entropy {res['usage_exp_entropy']:.2f})")
    else:
        click.echo(f"{split} perplexity {res['ppl']:.3f} ({res['tokens']:,} tokens, {res['path']}, "
                   f"{model.provider}, {res['seconds']:.1f} s); modules in use {res['modules_in_use']}/{M}")
