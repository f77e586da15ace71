"""One bundle benchmarked (``run``: DESIGN.md §8's report) and the report as a table.

For each batch size the variants (routed, dense, bound, torch, ort_moe; see
``modrt.peers``) are timed by ``modrt.bench.timing.measure`` over a pool of distinct
inputs. Latency is per call (one batch; for a recurrent bundle one window of ``--seq``
tokens); ``infer_per_s`` counts rows (batch x calls / s), as perf_analyzer counts
inferences.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from modrt._version import __version__
from modrt.bench.timing import BenchConfig, measure, stats

# ref_routed / ref_dense: another bundle of the same signature (``--against``, e.g. the float
# bundle an int8 one was quantised from), measured in the same interleaved loop.
VARIANTS = ("routed", "dense", "bound", "torch", "ort_moe", "ref_routed", "ref_dense")
RATIOS = (("dense", "routed"), ("routed", "bound"), ("routed", "ort_moe"), ("routed", "torch"),
          ("ref_routed", "routed"), ("ref_dense", "dense"), ("ref_dense", "ref_routed"))


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on this platform
        return None


def _cycling(f: Callable[[Any], object], pool: list) -> Callable[[], object]:
    it = itertools.cycle(pool)
    return lambda: f(next(it))


def run(
    bundle_dir: str | os.PathLike,
    cfg: BenchConfig,
    config: dict[str, Any] | None = None,
    progress: bool = True,
    against: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Benchmark one bundle (and ``against``, a second one of the same signature, side by
    side; ``checkpoint``: the training checkpoint the bundle came from, the PyTorch eager
    peer); returns the report (DESIGN.md §8's JSON shape)."""
    import onnxruntime as ort
    from tqdm import tqdm

    from modrt import peers, synthetic
    from modrt.runtime import load
    from modrt.runtime.sessions import SessionConfig

    scfg = SessionConfig(threads=cfg.threads, thread_pool=cfg.thread_pool)
    model = load(bundle_dir, provider=cfg.provider, strategy=cfg.strategy, session_config=scfg)
    m = model.manifest
    layer = m.layers[0]
    recurrent = m.topology == "recurrent"
    weights = None if recurrent else synthetic.read_weights(bundle_dir, m)
    skipped: dict[str, str] = {}
    feed = "tokens" if recurrent else model.input.name  # x (synthetic), image (CIFAR-10), ...
    makers: dict[str, Callable[[np.ndarray], object]] = {
        "routed": lambda v: model.run(**{feed: v}),
        "dense": lambda v: model.run_dense(**{feed: v}),
    }
    if against is not None:
        from modrt._exceptions import InputError

        other = load(against, provider=cfg.provider, strategy=cfg.strategy, session_config=scfg)
        if other.signature.inputs != model.signature.inputs:
            raise InputError(f"--against {against}: its inputs differ from {bundle_dir}'s")
        makers["ref_routed"] = lambda v: other.run(**{feed: v})
        makers["ref_dense"] = lambda v: other.run_dense(**{feed: v})
    if cfg.bound:
        makers["bound"] = peers.make_bound(model)
    else:
        skipped["bound"] = "disabled"
    def torch_peer():
        if checkpoint is not None:  # a trained bundle: the training model itself
            return peers.make_torch_checkpoint(checkpoint, model, scfg.intra_threads)
        if weights is None and not recurrent:
            return None, "modules are not two-layer MLPs (pass --checkpoint CKPT: the model it was exported from)"
        return peers.make_torch(weights, layer.k, layer.combine, scfg.intra_threads)

    for name, enabled, make in (
        ("torch", cfg.torch, torch_peer),
        ("ort_moe", cfg.ort_moe, lambda: peers.make_ort_moe(
            weights, layer.k, scfg, model.sessions[layer.controller].providers)),
    ):
        if recurrent and not (name == "torch" and checkpoint is not None):
            skipped[name] = ("feed-forward bundles only" if name == "ort_moe" else
                             "pass --checkpoint CKPT (the model the bundle was exported from)")
        elif not enabled:
            skipped[name] = "disabled"
        else:
            if name == "torch":  # torch's OpenMP threads must not spin between its calls
                os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            fn, why = make()
            if fn is None:
                skipped[name] = why
            else:
                makers[name] = fn
    load_before = _load_average()
    rng = np.random.default_rng(cfg.seed)
    results, parity = [], {}
    bar = tqdm(total=len(cfg.batches) * len(makers), unit="measurement", disable=not progress,
               file=sys.stderr, leave=False)
    with bar:
        for B in cfg.batches:
            # A pool of different inputs, cycled: consecutive calls route to different
            # modules, as consecutive requests do. One input repeated would keep the
            # selected modules' weights in cache (measured: a 32 MB module, 1.25 ms per
            # call repeated, 2.3 ms cycling over 16) and flatter routing unfairly.
            if recurrent:
                V = model.output.shape[-1]
                pool = [rng.integers(0, V, (B, cfg.seq), dtype=np.int64) for _ in range(cfg.inputs)]
                got, ref = model.run(tokens=pool[0]), model.run_dense(tokens=pool[0])
                key = "logits"
            else:
                from modrt.runtime.signature import random_rows  # (B, D), an image, or raw pixels

                pool = [random_rows(model.signature.input, B, rng) for _ in range(cfg.inputs)]
                got, ref = model.run(**{feed: pool[0]}), model.run_dense(**{feed: pool[0]})
                key = model.output.name
            parity[B] = float(np.abs(got[key] - ref[key]).max())
            if not np.array_equal(got["modules"], ref["modules"]):
                parity[B] = float("inf")  # a different routing decision: report it loudly
            bar.set_postfix(batch=B)
            fns = {k: _cycling(f, pool) for k, f in makers.items()}
            samples = measure(fns, cfg, on_done=lambda name: bar.update(1))
            row: dict[str, Any] = {"batch": B}
            for v in VARIANTS:
                if v.startswith("ref_") and against is None:
                    continue  # only with --against: the report's rows keep DESIGN.md §8's keys otherwise
                row[v] = stats(samples[v], B, cfg.seq if recurrent else None) if v in samples else None
            row["strategy"] = model.strategy_for(B)
            results.append(row)
    return {
        "modrt_version": __version__,
        "onnxruntime": ort.__version__,
        "provider": model.provider,
        "threads": scfg.intra_threads,
        "config": {
            **(config or {"bundle": str(bundle_dir)}),
            "topology": m.topology, "modules": layer.modules, "k": layer.k,
            "combine": layer.combine, **({"seq": cfg.seq} if recurrent else {}),
            "batches": list(cfg.batches), "seconds": cfg.seconds,
            "thread_pool": cfg.thread_pool, "skipped": skipped,
            "strategy": cfg.strategy, "strategy_choice": model.choice,
            "precision": sorted({g.precision for g in m.graphs.values()}),
            **({"against": str(against)} if against is not None else {}),
            "ort_moe_exact": layer.k == 1 and layer.combine == "sum",
            "parity_max_abs_diff": {str(b): d for b, d in parity.items()},
            # Other processes' load, before and after: read the numbers in its light.
            "load_average": [load_before, _load_average()],
        },
        "results": results,
    }


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table: p50 (p99) per variant, then ratios and rows/s."""
    c = report["config"]
    head = (f"modrt bench  {'synthetic ' if c.get('synthetic') else ''}{c['topology']}  "
            f"M={c['modules']} K={c['k']} {c['combine']}"
            + (f"  dims={','.join(map(str, c['dims']))}" if "dims" in c else "")
            + (f"  seq={c['seq']}" if "seq" in c else "")
            + f"\nprovider={report['provider']}  threads={report['threads']}  "
            f"onnxruntime={report['onnxruntime']}  modrt={report['modrt_version']}  "
            f"strategy={c.get('strategy', '-')}"
            + (f"  load average {c['load_average'][0]} -> {c['load_average'][1]}"
               if c.get("load_average") and None not in c["load_average"] else ""))
    if c.get("against"):
        head += f"\nref_* = {c['against']} (the same inputs, measured side by side)"
    lines = [head, "", "latency µs: p50 (p99)"]
    cols = [v for v in VARIANTS if any(r.get(v) for r in report["results"])]
    lines.append(f"{'batch':>6}" + "".join(f"{v:>22}" for v in cols) + "  routed strategy")
    for r in report["results"]:
        lines.append(f"{r['batch']:>6}" + "".join(
            f"{r[v]['p50_us']:>12,.0f} ({r[v]['p99_us']:>7,.0f})" for v in cols) + f"  {r['strategy']}")
    ratios = [(a, b) for a, b in RATIOS if a in cols and b in cols]
    widths = [max(17, len(a) + len(b) + 3) for a, b in ratios]
    lines += ["", "ratios of p50 (dense/routed: the speed-up; routed/x below 1: routed is faster)",
              f"{'batch':>6}" + "".join(f"{a + '/' + b:>{w}}" for (a, b), w in zip(ratios, widths, strict=True))]
    for r in report["results"]:
        lines.append(f"{r['batch']:>6}" + "".join(
            f"{r[a]['p50_us'] / r[b]['p50_us']:>{w - 1}.2f}x" for (a, b), w in zip(ratios, widths, strict=True)))
    unit = "tokens/s" if "seq" in c else "infer/s (rows)"
    key = "tokens_per_s" if "seq" in c else "infer_per_s"
    lines += ["", f"throughput, {unit}", f"{'batch':>6}" + "".join(f"{v:>14}" for v in cols)]
    for r in report["results"]:
        lines.append(f"{r['batch']:>6}" + "".join(f"{r[v][key]:>14,.0f}" for v in cols))
    if c.get("skipped"):
        lines += [""] + [f"{k}: skipped ({why})" for k, why in c["skipped"].items()]
    diffs = c.get("parity_max_abs_diff", {})
    if "int8" in c.get("precision", ()):  # activations are quantised per call, on different rows
        if any(d == float("inf") for d in diffs.values()):
            lines.append(f"WARNING: routed and dense route differently at batch(es) {diffs}")
        else:
            lines.append(f"int8: routed and dense quantise activations per call (on different rows), so they "
                         f"differ by up to {max(diffs.values(), default=0):.3g}")
    else:
        bad = {b: d for b, d in diffs.items() if not d <= 1e-3}
        if bad:
            lines.append(f"WARNING: routed differs from dense at batch(es) {bad}")
    return "\n".join(lines)


__all__ = ["RATIOS", "VARIANTS", "format_table", "run"]
