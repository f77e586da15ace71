"""``modrt bundle``: operate on a bundle without torch.

    modrt bundle verify OUT/ [--data PTB]    checksums, schema, and parity measured again
    modrt bundle diff A/ B/                  which graphs (and which manifest fields) differ
    modrt bundle replace OUT/ GRAPH NEW.onnx one graph swapped in, atomically; parity stale

``verify`` loads the bundle as the runtime does (every graph's sha256, the manifest's
schema and types, each graph's inputs and outputs against the manifest), then measures
parity again where it can: for a Penn Treebank bundle the routed and dense perplexity on
the export's validation streams (equal to the recorded figures within ``--rtol``), and for
an int8 bundle (``modrt quantize``) its recorded int8 perplexity; for any bundle, routed
against dense on random inputs (routing equal, outputs within ``--atol`` for float
bundles). Exit 1 with one line per failure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np

from modrt._exceptions import InputError, ModrtError


def verify(directory: Path, data: Path | None = None, rtol: float = 1e-4, atol: float = 1e-4) -> dict[str, Any]:
    """{"checks": [(name, ok, detail)]}; raises ModrtError for a bundle that does not load."""
    from modrt import bundle
    from modrt.runtime import load

    m = bundle.load(directory)  # checksums, schema, types, graph inputs and outputs
    checks: list[tuple[str, bool, str]] = [("checksums and schema", True, f"{len(m.graphs)} graphs")]
    model = load(directory, provider="cpu", strategy="host")
    int8 = any(g.precision == "int8" for g in m.graphs.values())
    from modrt.evaluate import probe_feeds

    feeds = probe_feeds(model)
    a, b, key = model.run(**feeds), model.run_dense(**feeds), model.signature.outputs[0].name
    diff = float(np.abs(a[key] - b[key]).max())
    same = bool(np.array_equal(a["modules"], b["modules"]))
    if int8:
        checks.append(("routed vs dense (random inputs)", True,
                       f"int8: max |diff| {diff:.3g}, routing {'equal' if same else 'differs'} (activations are "
                       "quantised per call)"))
    else:
        checks.append(("routed vs dense (random inputs)", same and diff <= atol,
                       f"max |diff| {diff:.3g} (atol {atol:g}), routing {'equal' if same else 'DIFFERS'}"))
    if m.topology == "recurrent" and m.task.get("name") == "ptb" and "ppl_routed" in m.parity:
        checks += _ptb_parity(directory, m, model, data, rtol, int8)
    elif m.parity.get("stale"):
        checks.append(("parity", False, "marked stale (a graph was replaced): verify with --data to measure it"))
    return {"checks": checks, "ok": all(ok for _, ok, _ in checks)}


def _ptb_parity(directory: Path, m, model, data, rtol: float, int8: bool) -> list[tuple[str, bool, str]]:
    """A PTB bundle's perplexity measured again by the protocol that recorded it: int8 by
    ``modrt quantize``'s, otherwise the export's streams; a stale record is replaced."""
    from dataclasses import replace

    from modrt import bundle
    from modrt.evaluate import parity_streams, perplexity, split_ids, stream_ppl

    p, ids = m.parity, split_ids(m, "valid", data)
    q = p.get("int8")
    if int8 and q and "requested_tokens" in q and not p.get("stale"):
        got, want = perplexity(model, ids[: q["requested_tokens"]])["ppl"], q["ppl_int8"]  # 10 streams
        rel = abs(got / want - 1)
        return [("int8 perplexity", rel <= rtol,
                 f"{got:.4f} now, {want:.4f} at quantize ({q['parity_tokens']} validation tokens; rel {rel:.1e})")]
    bptt = p.get("bptt", 35)
    # Bundles exported before parity_tokens was recorded asked for export's default, 2000.
    xs, ys = parity_streams(ids, p.get("parity_tokens", 2000), p.get("batch", 4), bptt)
    if xs.size != p.get("tokens"):
        return [("parity perplexity", False, f"cannot rebuild the export's {p.get('tokens')} parity tokens (the "
                 "bundle does not record how many were asked for): export it again")]
    routed, dense = stream_ppl(model, xs, ys, bptt), stream_ppl(model, xs, ys, bptt, dense=True)
    if p.get("stale"):  # a graph was replaced: no record to compare with; routed and dense must agree
        ok = abs(routed / dense - 1) <= rtol or int8
        if ok:
            fresh = {k: v for k, v in p.items() if k != "stale"}
            bundle.write(directory, replace(m, parity={**fresh, "ppl_routed": routed, "ppl_dense": dense,
                                                       "remeasured": True}))
        return [("routed vs dense perplexity (parity was stale)", ok,
                 f"routed {routed:.4f}, dense {dense:.4f} on {xs.size} validation tokens; recorded")]
    checks = []
    for name, got, want in (("routed", routed, p["ppl_routed"]), ("dense", dense, p["ppl_dense"])):
        rel = abs(got / want - 1)
        checks.append((f"{name} perplexity", rel <= rtol,
                       f"{got:.4f} now, {want:.4f} at export ({xs.size} validation tokens; rel {rel:.1e})"))
    return checks


def diff(a: Path, b: Path) -> dict[str, Any]:
    """Graphs that differ (sha256), that only one bundle has, and differing manifest fields."""
    from modrt import bundle

    ma, mb = bundle.load(a, verify=False), bundle.load(b, verify=False)
    ga, gb = ma.graphs, mb.graphs
    changed = sorted(n for n in set(ga) & set(gb) if ga[n].sha256 != gb[n].sha256)
    fields = {}
    ja, jb = ma.to_json(), mb.to_json()
    for k in sorted(set(ja) | set(jb)):
        if k in ("graphs", "parity"):
            continue
        if ja.get(k) != jb.get(k):
            fields[k] = (ja.get(k), jb.get(k))
    return {"changed": changed, "only_a": sorted(set(ga) - set(gb)), "only_b": sorted(set(gb) - set(ga)),
            "precision": {n: (ga[n].precision, gb[n].precision) for n in changed if ga[n].precision != gb[n].precision},
            "fields": fields}


def replace_graph(directory: Path, name: str, new: Path) -> str:
    """Put ``new`` (an ONNX file) in place of graph ``name``: refused, with one line, when its
    inputs or outputs (names, dtypes, shapes) differ from the graph it replaces. Atomic:
    the new graph is written under a new file name, then the manifest is swapped in one
    rename, then the old file removed, so a crash at any point leaves a bundle that loads
    (the old one until the rename, the new one after). Parity is marked stale until
    ``verify --data`` measures it again. Returns the new file's name."""
    import dataclasses
    import os
    import shutil

    from modrt import bundle

    m = bundle.load(directory)
    if name not in m.graphs:
        raise InputError(f"{directory}: no graph {name!r}; it has {', '.join(sorted(m.graphs))}")
    if not new.is_file():
        raise InputError(f"{new}: no such file")
    spec = bundle.graph_spec_from_onnx(new)  # BundleError (one line) when it is not ONNX
    old = m.graphs[name]
    for kind, want, have in (("inputs", old.inputs, spec.inputs), ("outputs", old.outputs, spec.outputs)):
        if [(t.name, t.dtype, t.shape) for t in want] != [(t.name, t.dtype, t.shape) for t in have]:
            raise InputError(f"{new}: its {kind} {[(t.name, t.dtype, list(t.shape)) for t in have]} differ from "
                             f"graph {name!r}'s {[(t.name, t.dtype, list(t.shape)) for t in want]}")
    file = f"{name}.{spec.sha256[:12]}.onnx"
    tmp = directory / (file + ".tmp")
    shutil.copyfile(new, tmp)
    os.replace(tmp, directory / file)
    precision = "int8" if _is_int8(new) else "float32"
    graphs = {**m.graphs, name: dataclasses.replace(spec, file=file, precision=precision)}
    parity = {**m.parity, "stale": f"graph {name!r} replaced; modrt bundle verify --data measures it again"}
    bundle.write(directory, dataclasses.replace(m, graphs=graphs, parity=parity))  # the one atomic step
    if old.file != file and not any(g.file == old.file for g in graphs.values()):
        (directory / old.file).unlink(missing_ok=True)
    return file


def _is_int8(path: Path) -> bool:
    import onnx

    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    return bool(ops & {"MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "ConvInteger"})


@click.group("bundle")
def bundle_group() -> None:
    """Operate on a bundle: verify it, compare two, replace one graph."""


@bundle_group.command("verify")
@click.argument("directory", metavar="OUT/", type=click.Path(file_okay=False, path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Penn Treebank directory for the parity perplexity [default: the usual lookup].")
@click.option("--rtol", default=1e-4, show_default=True, type=click.FloatRange(min=0),
              help="Allowed relative change of the recorded perplexities.")
@click.option("--atol", default=1e-4, show_default=True, type=click.FloatRange(min=0),
              help="Allowed |routed - dense| on random inputs (float bundles).")
def verify_command(directory: Path, data: Path | None, rtol: float, atol: float) -> None:
    """Check OUT/: checksums, schema, graphs' inputs and outputs, and parity measured again."""
    r = verify(directory, data, rtol, atol)
    for name, ok, detail in r["checks"]:
        click.echo(f"{'ok  ' if ok else 'FAIL'}  {name}: {detail}")
    if not r["ok"]:
        raise ModrtError(f"{directory}: {sum(not ok for _, ok, _ in r['checks'])} check(s) failed")


@bundle_group.command("replace")
@click.argument("directory", metavar="OUT/", type=click.Path(file_okay=False, path_type=Path))
@click.argument("name", metavar="GRAPH")
@click.argument("new", metavar="NEW.onnx", type=click.Path(dir_okay=False, path_type=Path))
def replace_command(directory: Path, name: str, new: Path) -> None:
    """Replace one graph of OUT/ (e.g. layer0.module3) by NEW.onnx of the same inputs and outputs."""
    file = replace_graph(directory, name, new)
    click.echo(f"replaced {name} by {new} ({file}); parity is stale: modrt bundle verify {directory} --data ...")


@bundle_group.command("diff")
@click.argument("a", metavar="A/", type=click.Path(file_okay=False, path_type=Path))
@click.argument("b", metavar="B/", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the differences as JSON.")
def diff_command(a: Path, b: Path, as_json: bool) -> None:
    """Which graphs of A/ and B/ differ; exit 1 when they differ (as diff(1) does)."""
    if a.resolve() == b.resolve():
        raise InputError("give two different bundle directories")
    d = diff(a, b)
    if as_json:
        click.echo(json.dumps(d, indent=1))
    else:
        for n in d["changed"]:
            p = d["precision"].get(n)
            click.echo(f"changed  {n}" + (f"  ({p[0]} -> {p[1]})" if p else ""))
        for n in d["only_a"]:
            click.echo(f"only in {a}: {n}")
        for n in d["only_b"]:
            click.echo(f"only in {b}: {n}")
        for k, (x, y) in d["fields"].items():
            click.echo(f"manifest {k}: {json.dumps(x)[:80]} -> {json.dumps(y)[:80]}")
        if not any((d["changed"], d["only_a"], d["only_b"], d["fields"])):
            click.echo("same graphs")
    if any((d["changed"], d["only_a"], d["only_b"], d["fields"])):
        raise SystemExit(1)


__all__ = ["bundle_group", "diff", "replace_graph", "verify"]
