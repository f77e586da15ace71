"""``modrt quantize OUT/ OUT-INT8/``: a bundle with int8 module graphs, head and dense baseline.

Dynamic int8 quantisation (ONNX Runtime's ``onnxruntime.quantization.quantize_dynamic``):
each MatMul's weights are stored as int8 with a scale, its activations are quantised per
call (``DynamicQuantizeLinear`` -> ``MatMulInteger``); inputs and outputs stay float32, so
the bundle's tensors, the runtime and the server are unchanged. What is quantised:

- every module graph and every dense baseline graph (in a dense graph the controller's
  MatMuls, the ancestors of its selection, are left float: routing stays the float routing);
- the stages after the last modular layer (the head: PTB's 10,000-way softmax is most of
  a step's time);
- the controllers only with ``controller=True``.

With float controllers a feed-forward bundle routes exactly as the float one does. A
recurrent bundle's controller reads the state the (int8) modules computed, so its routing
can drift from the float bundle's over a window: parity reports how often whole windows
agree.

The embedding (a Gather) and the glue stay float. The manifest records each graph's
``precision``; ``parity.int8`` holds what was measured against the float bundle: for a
language model the perplexity of both on validation text and its relative change, for any
bundle the largest |output difference| and the routing agreement on the same inputs. A
perplexity rise over ``max_delta`` (relative, default 1%) is refused, and the output
removed, unless ``force``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from modrt import bundle
from modrt._exceptions import ModrtError

SELECTION_OPS = {"ArgMax", "TopK", "LogSoftmax", "Softmax"}


class QuantizeError(ModrtError):
    """The int8 bundle was refused (its accuracy moved more than allowed): nothing written."""


def controller_nodes(model) -> list[str]:
    """Names of the nodes a graph's routing decision depends on: every ancestor of its
    selection ops (ArgMax / TopK / the controller's softmax). Left float in a dense graph."""
    producer = {o: n for n in model.graph.node for o in n.output}
    todo = [n for n in model.graph.node if n.op_type in SELECTION_OPS]
    seen: dict[str, Any] = {}
    while todo:
        n = todo.pop()
        if n.name in seen:
            continue
        seen[n.name] = n
        todo.extend(producer[i] for i in n.input if i in producer)
    return [name for name in seen if name]


def plan(manifest: bundle.Manifest, controller: bool = False) -> dict[str, bool]:
    """The graphs to quantise -> whether their controller's nodes stay float (a dense graph
    holds its layer's controller; with ``controller`` nothing stays float)."""
    names = {l.name for l in manifest.layers}
    last = max(i for i, s in enumerate(manifest.stages) if s in names)
    chosen: dict[str, bool] = {}
    for layer in manifest.layers:
        for g in layer.module_graphs:
            chosen[g] = False
        if controller:
            chosen[layer.controller] = False
        if layer.name in manifest.dense:
            chosen[manifest.dense[layer.name]] = not controller
    for s in manifest.stages[last + 1:]:
        chosen[s] = False
    return chosen


def quantize(src: str | os.PathLike, dst: str | os.PathLike, controller: bool = False, max_delta: float = 0.01,
             force: bool = False, data: str | os.PathLike | None = None, parity_tokens: int = 20_000,
             progress: bool = True) -> dict[str, Any]:
    """Write the int8 bundle; returns its parity record. Raises ModrtError (one line)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from tqdm import tqdm

    src, dst = Path(src), Path(dst)
    m = bundle.load(src)
    if src.resolve() == dst.resolve():
        raise ModrtError(f"{dst}: the int8 bundle must go to another directory than {src}")
    _prepare(dst, force)
    work = Path(tempfile.mkdtemp(prefix=".modrt-int8-", dir=dst.parent))
    try:
        for spec in m.graphs.values():
            shutil.copy2(src / spec.file, work / spec.file)
        graphs = dict(m.graphs)
        quantised = []
        for name, keep_selection in tqdm(plan(m, controller).items(), desc="quantize", unit="graph",
                                         disable=not progress):
            spec = m.graphs[name]
            path = work / spec.file
            model = onnx.load(str(path))
            named = work / (spec.file + ".named")  # the quantiser excludes nodes by name: name them all
            for i, node in enumerate(model.graph.node):
                if not node.name:
                    node.name = f"{node.op_type}_{i}"
            onnx.save(model, str(named))
            exclude = controller_nodes(model) if keep_selection else []
            tmp = path.with_suffix(".int8.onnx")
            with _quiet_advice():
                quantize_dynamic(str(named), str(tmp), weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                                 op_types_to_quantize=["MatMul", "Gemm"])
            named.unlink()
            if not any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in onnx.load(str(tmp)).graph.node):
                tmp.unlink()  # nothing in it to quantise: it stays float
                continue
            os.replace(tmp, path)
            graphs[name] = replace(bundle.graph_spec_from_onnx(path), precision="int8")
            quantised.append(name)
        if not quantised:
            raise ModrtError(f"{src}: no graph has MatMul weights to quantise")
        q = replace(m, graphs=graphs)
        bundle.write(work, q)
        record = measure(src, work, data=data, tokens=parity_tokens, progress=progress)
        record.update(quantised=quantised, controller_quantised=controller, max_delta=max_delta)
        delta = record.get("ppl_delta")
        if delta is not None and delta > max_delta and not force:
            raise QuantizeError(
                f"int8 perplexity {record['ppl_int8']:.3f} is {100 * delta:.2f}% above float {record['ppl_float']:.3f}"
                f" (allowed {100 * max_delta:.2f}%, --max-delta); nothing written (--force keeps it anyway)")
        bundle.write(work, replace(q, parity={**m.parity, "int8": record}))
        bundle.load(work)  # the result validates as any bundle does
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(work, dst)
        return record
    finally:
        if work.exists():
            shutil.rmtree(work)


def measure(float_dir: Path, int8_dir: Path, data=None, tokens: int = 20_000, progress: bool = False
            ) -> dict[str, Any]:
    """The int8 bundle against the float one on the same inputs: max |output diff|, routing
    agreement, and for a PTB language model the perplexity of both on validation text."""
    from modrt.evaluate import probe_feeds
    from modrt.runtime import load

    f = load(float_dir, provider="cpu", strategy="host")
    q = load(int8_dir, provider="cpu", strategy="host")
    rec: dict[str, Any] = {}
    feeds = probe_feeds(f)
    a, b = f.run(**feeds), q.run(**feeds)
    key = f.signature.outputs[0].name  # logits, or the feed-forward output
    rec["max_abs_diff"] = float(np.abs(a[key] - b[key]).max())
    rec["max_abs_output"] = float(np.abs(a[key]).max())
    rec["routing_agreement"] = float((a["modules"] == b["modules"]).all(-1).all(-1).mean())
    if f.topology == "recurrent" and f.manifest.task.get("name") == "ptb":
        from modrt.evaluate import perplexity, split_ids

        ids = split_ids(f.manifest, "valid", data)[:tokens]
        pf, pq = perplexity(f, ids, progress=progress), perplexity(q, ids, progress=progress)
        rec.update(ppl_float=pf["ppl"], ppl_int8=pq["ppl"], ppl_delta=pq["ppl"] / pf["ppl"] - 1.0,
                   parity_tokens=pf["tokens"], requested_tokens=tokens, split="valid")
    return rec


@contextlib.contextmanager
def _quiet_advice():
    """ONNX Runtime's quantiser logs "consider pre-processing" on the root logger for every
    graph (advice for image models with shape-dependent ops); modrt's graphs are MatMul +
    elementwise with declared shapes."""
    def drop(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider to run pre-processing")

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _prepare(dst: Path, force: bool) -> None:
    bundle.prepare_output(dst, force, ModrtError)  # replaced only once the new one is whole
    dst.parent.mkdir(parents=True, exist_ok=True)


def summary(record: dict[str, Any], dst: Path) -> str:
    lines = [f"quantized {len(record['quantised'])} graphs to int8 -> {dst}"]
    if "ppl_float" in record:
        lines.append(f"  perplexity on {record['parity_tokens']:,} validation tokens: float {record['ppl_float']:.3f}, "
                     f"int8 {record['ppl_int8']:.3f} ({100 * record['ppl_delta']:+.2f}%)")
    lines.append(f"  max |output diff| {record['max_abs_diff']:.3g} (outputs up to {record['max_abs_output']:.3g}); "
                 f"routing agreement {100 * record['routing_agreement']:.1f}%")
    return "\n".join(lines)


def _cli():
    import click

    @click.command("quantize")
    @click.argument("src", metavar="OUT/", type=click.Path(file_okay=False, path_type=Path))
    @click.argument("dst", metavar="OUT-INT8/", type=click.Path(file_okay=False, path_type=Path))
    @click.option("--controller", is_flag=True,
                  help="Quantise the controllers too (routing may then differ from the float bundle's; "
                       "parity reports the agreement).")
    @click.option("--max-delta", default=0.01, show_default=True, type=click.FloatRange(min=0),
                  help="Refuse when int8 perplexity exceeds float's by more than this fraction.")
    @click.option("--force", is_flag=True, help="Keep a bundle over --max-delta; replace OUT-INT8 if it exists.")
    @click.option("--data", type=click.Path(path_type=Path), default=None,
                  help="Penn Treebank directory for the parity perplexity [default: the usual lookup].")
    @click.option("--parity-tokens", default=20_000, show_default=True, type=click.IntRange(min=100),
                  help="Validation tokens the perplexities are measured on.")
    @click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
    def command(src, dst, controller, max_delta, force, data, parity_tokens, quiet):
        """Write OUT-INT8/: OUT/ with dynamic int8 module graphs, head and dense baseline.

        \b
        The controllers stay float32 (routing is exactly the float bundle's) unless
        --controller. Parity is measured on real data and recorded in the manifest;
        a perplexity rise over --max-delta is refused unless --force.
        """
        record = quantize(src, dst, controller=controller, max_delta=max_delta, force=force, data=data,
                          parity_tokens=parity_tokens, progress=not quiet)
        click.echo(summary(record, dst))

    return command


command = _cli()

__all__ = ["QuantizeError", "command", "controller_nodes", "measure", "plan", "quantize"]
