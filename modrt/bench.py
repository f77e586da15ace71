"""``modrt bench``: the routed bundle against dense and its peers, in one process and one
run (DESIGN.md §8).

For each batch size the variants (routed, dense, bound, torch, ort_moe; see
``modrt.peers``) are measured *interleaved*: round after round, each variant runs for a
short block, until every one has had its time budget. Background load then hits all of
them alike, so the ratios hold even when absolute numbers are noisy. Latency is per call
(one batch; for a recurrent bundle one window of ``--seq`` tokens); ``infer_per_s``
counts rows (batch x calls / s), as perf_analyzer counts inferences.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from modrt._exceptions import InputError
from modrt._version import __version__
from modrt.cli import PROVIDER
from modrt.runtime.auto import STRATEGIES

VARIANTS = ("routed", "dense", "bound", "torch", "ort_moe")
STRATEGY_CHOICES = STRATEGIES  # auto | host | graph | fused
RATIOS = (("dense", "routed"), ("routed", "bound"), ("routed", "ort_moe"), ("routed", "torch"))


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and for how long."""

    batches: tuple[int, ...] = (1, 8, 64)
    seq: int = 35  # tokens per window for recurrent bundles
    seconds: float = 2.0  # measured time per variant and batch size
    block: float = 0.25  # seconds a variant runs before the next one's turn
    warmup: int = 3  # unmeasured calls per variant and batch size
    inputs: int = 32  # distinct inputs per batch size, cycled through
    min_iters: int = 5
    max_iters: int = 100_000
    provider: str = "auto"
    threads: int = 0  # intra-op threads per session; 0: all cores
    thread_pool: str = "session"
    torch: bool = True
    ort_moe: bool = True
    bound: bool = True
    strategy: str = "auto"  # how the routed bundle runs its modular layers (modrt.load)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGY_CHOICES:
            raise ValueError(f"strategy {self.strategy!r} unknown; choose one of {', '.join(STRATEGY_CHOICES)}")
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {list(self.batches)}")
        if self.seq < 1 or self.seconds <= 0 or self.warmup < 0 or self.min_iters < 1:
            raise ValueError("need seq >= 1, seconds > 0, warmup >= 0, min_iters >= 1")


def measure(
    fns: dict[str, Callable[[], object]],
    cfg: BenchConfig,
    on_done: Callable[[str], None] = lambda name: None,
) -> dict[str, np.ndarray]:
    """Interleaved timing; returns the per-call latencies in ns of every variant."""
    for f in fns.values():
        for _ in range(cfg.warmup):
            f()
    samples: dict[str, list[int]] = {k: [] for k in fns}
    spent = dict.fromkeys(fns, 0)
    budget, block = int(cfg.seconds * 1e9), int(cfg.block * 1e9)
    active = list(fns)
    clock = time.perf_counter_ns
    gc_was = gc.isenabled()
    gc.disable()  # a collection inside one timed call is noise, not the runtime's cost
    try:
        while active:
            for name in list(active):
                f, s = fns[name], samples[name]
                end = clock() + block
                while True:
                    t0 = clock()
                    f()
                    dt = clock() - t0
                    s.append(dt)
                    spent[name] += dt
                    if (spent[name] >= budget and len(s) >= cfg.min_iters) or len(s) >= cfg.max_iters:
                        active.remove(name)
                        on_done(name)
                        break
                    if clock() >= end:
                        break
    finally:
        if gc_was:
            gc.enable()
    return {k: np.asarray(v, dtype=np.int64) for k, v in samples.items()}


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on this platform
        return None


def _cycling(f: Callable[[Any], object], pool: list) -> Callable[[], object]:
    it = itertools.cycle(pool)
    return lambda: f(next(it))


def stats(ns: np.ndarray, batch: int, seq: int | None = None) -> dict[str, float]:
    us = ns / 1e3
    p50, p90, p95, p99 = np.percentile(us, [50, 90, 95, 99])
    rows_per_s = batch * len(ns) / (ns.sum() / 1e9)
    out = {"p50_us": round(float(p50), 1), "p90_us": round(float(p90), 1),
           "p95_us": round(float(p95), 1), "p99_us": round(float(p99), 1),
           "infer_per_s": round(float(rows_per_s), 1)}
    if seq is not None:
        out["tokens_per_s"] = round(float(rows_per_s * seq), 1)
    return out


def run(
    bundle_dir: str | os.PathLike,
    cfg: BenchConfig,
    config: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Benchmark one bundle; returns the report (DESIGN.md §8's JSON shape)."""
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
    makers: dict[str, Callable[[np.ndarray], object]] = {
        "routed": (lambda v: model.run(tokens=v)) if recurrent else (lambda v: model.run(x=v)),
        "dense": (lambda v: model.run_dense(tokens=v)) if recurrent else (lambda v: model.run_dense(x=v)),
    }
    if cfg.bound:
        makers["bound"] = peers.make_bound(model)
    else:
        skipped["bound"] = "disabled"
    for name, enabled, make in (
        ("torch", cfg.torch, lambda: peers.make_torch(weights, layer.k, layer.combine, scfg.intra_threads)),
        ("ort_moe", cfg.ort_moe, lambda: peers.make_ort_moe(
            weights, layer.k, scfg, model.sessions[layer.controller].providers)),
    ):
        if recurrent:
            skipped[name] = "feed-forward bundles only"
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
                D = model.input.shape[1]
                pool = [rng.standard_normal((B, D), dtype=np.float32) for _ in range(cfg.inputs)]
                got, ref = model.run(x=pool[0]), model.run_dense(x=pool[0])
                key = model.output.name
            parity[B] = float(np.abs(got[key] - ref[key]).max())
            if not np.array_equal(got["modules"], ref["modules"]):
                parity[B] = float("inf")  # a different routing decision: report it loudly
            bar.set_postfix(batch=B)
            fns = {k: _cycling(f, pool) for k, f in makers.items()}
            samples = measure(fns, cfg, on_done=lambda name: bar.update(1))
            row: dict[str, Any] = {"batch": B}
            for v in VARIANTS:
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
    lines = [head, "", "latency µs: p50 (p99)"]
    cols = [v for v in VARIANTS if any(r[v] for r in report["results"])]
    lines.append(f"{'batch':>6}" + "".join(f"{v:>22}" for v in cols) + "  routed strategy")
    for r in report["results"]:
        lines.append(f"{r['batch']:>6}" + "".join(
            f"{r[v]['p50_us']:>12,.0f} ({r[v]['p99_us']:>7,.0f})" for v in cols) + f"  {r['strategy']}")
    ratios = [(a, b) for a, b in RATIOS if a in cols and b in cols]
    lines += ["", "ratios of p50 (dense/routed: the speed-up; routed/x below 1: routed is faster)",
              f"{'batch':>6}" + "".join(f"{a + '/' + b:>17}" for a, b in ratios)]
    for r in report["results"]:
        lines.append(f"{r['batch']:>6}" + "".join(
            f"{r[a]['p50_us'] / r[b]['p50_us']:>16.2f}x" for a, b in ratios))
    unit = "tokens/s" if "seq" in c else "infer/s (rows)"
    key = "tokens_per_s" if "seq" in c else "infer_per_s"
    lines += ["", f"throughput, {unit}", f"{'batch':>6}" + "".join(f"{v:>14}" for v in cols)]
    for r in report["results"]:
        lines.append(f"{r['batch']:>6}" + "".join(f"{r[v][key]:>14,.0f}" for v in cols))
    if c.get("skipped"):
        lines += [""] + [f"{k}: skipped ({why})" for k, why in c["skipped"].items()]
    bad = {b: d for b, d in c.get("parity_max_abs_diff", {}).items() if not d <= 1e-3}
    if bad:
        lines.append(f"WARNING: routed differs from dense at batch(es) {bad}")
    return "\n".join(lines)


class OneLineUsageError(click.UsageError):
    """A usage error (exit 2) shown as one red line, without click's usage banner."""

    def show(self, file=None) -> None:  # noqa: D401 - click's signature
        click.secho(f"error: {self.format_message()}", fg="red", err=True)


class StrategyType(click.ParamType):
    """``--strategy auto|host|graph|fused``; anything else: one line, exit 2."""

    name = "strategy"

    def convert(self, value, param, ctx):
        v = str(value).lower()
        if v in STRATEGY_CHOICES:
            return v
        raise OneLineUsageError(f"--strategy {value!r} unknown; choose one of {', '.join(STRATEGY_CHOICES)}", ctx)

    def get_metavar(self, param, ctx=None):  # noqa: D102 - click API
        return "[" + "|".join(STRATEGY_CHOICES) + "]"


STRATEGY = StrategyType()
STRATEGY_HELP = ("How modular layers run: auto (measure at load, keep the fastest per batch range, cached), "
                 "host (numpy over per-module sessions), graph (one composed ONNX graph per layer), "
                 "fused (ORT's MoE op, MLP modules).")


def _ints(text: str, what: str, count: int | None = None) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1 or (count is not None and len(vals) != count):
        n = f"{count} " if count else ""
        raise InputError(f"{what} must be {n}positive comma-separated integers, got {text!r}")
    return vals


@click.command("bench")
@click.argument("bundle_dir", required=False, type=click.Path(file_okay=False))
@click.option("--synthetic", is_flag=True, help="Build a random-weight feed-forward bundle and bench it.")
@click.option("--modules", "-M", default=16, show_default=True, help="Synthetic: modules M.")
@click.option("--k", "-K", default=1, show_default=True, help="Synthetic: slots K.")
@click.option("--dims", default="1024,4096,1024", show_default=True, help="Synthetic: D,H,D_out.")
@click.option("--combine", type=click.Choice(["sum", "mean"]), default="sum", show_default=True,
              help="Synthetic: combination rule.")
@click.option("--batch", "batches", default="1,8,64", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--seq", default=35, show_default=True, help="Recurrent bundles: tokens per window.")
@click.option("--seconds", type=float, default=None,
              help="Measured time per variant and batch size [default: 2.0; 0.3 with --sweep].")
@click.option("--warmup", default=3, show_default=True, help="Unmeasured calls per variant and batch size.")
@click.option("--provider", type=PROVIDER, default="auto", show_default=True,
              help="ONNX Runtime execution provider; auto: TensorRT, then CUDA, then CPU.")
@click.option("--threads", default=0, show_default=True, help="Intra-op threads per session (0: all cores).")
@click.option("--thread-pool", type=click.Choice(["session", "global"]), default="session",
              show_default=True, help="A thread pool per session, or ORT's one per process.")
@click.option("--strategy", type=STRATEGY, default="auto", show_default=True, help=STRATEGY_HELP)
@click.option("--no-torch", is_flag=True, help="Skip the PyTorch eager peer.")
@click.option("--no-ort-moe", is_flag=True, help="Skip ONNX Runtime's fused MoE peer.")
@click.option("--seed", default=0, show_default=True, help="Weights (synthetic) and inputs.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the report as JSON.")
@click.option("--sweep", is_flag=True,
              help="Vary the module width of synthetic bundles (M=16 K=1 and M=15 K=3); write CSV and PNG.")
@click.option("--widths", default="64,128,256,512,1024,2048,4096", show_default=True,
              help="--sweep: module widths (hidden units); inputs/outputs are min(width, --d-max) wide.")
@click.option("--d-max", default=1024, show_default=True, help="--sweep: largest input/output width.")
@click.option("--sweep-configs", default="16:1,15:3", show_default=True, help="--sweep: M:K pairs.")
@click.option("--out", "out_prefix", default="sweep", show_default=True, type=click.Path(dir_okay=False),
              help="--sweep: write OUT.csv and OUT.png.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def bench(bundle_dir: str | None, synthetic: bool, modules: int, k: int, dims: str, combine: str,
          batches: str, seq: int, seconds: float, warmup: int, provider: str, threads: int,
          thread_pool: str, strategy: str, no_torch: bool, no_ort_moe: bool, seed: int,
          json_path: str | None, sweep: bool, widths: str, d_max: int, sweep_configs: str,
          out_prefix: str, quiet: bool) -> None:
    """Measure routed vs dense vs peers on BUNDLE_DIR, on a --synthetic bundle, or --sweep widths.

    \b
    modrt bench out/ --batch 1,8,64
    modrt bench --synthetic --modules 16 --k 1 --dims 1024,4096,1024 --json bench.json
    modrt bench --sweep --widths 64,256,1024,4096 --out results/sweep
    """
    if sweep and (bundle_dir or synthetic):
        raise InputError("--sweep builds its own bundles: give neither a bundle directory nor --synthetic")
    if not sweep and bool(bundle_dir) == bool(synthetic):
        raise InputError("give a bundle directory or --synthetic (not both)")
    try:
        cfg = BenchConfig(batches=_ints(batches, "--batch"), seq=seq,
                          seconds=seconds if seconds is not None else (0.3 if sweep else 2.0),
                          warmup=warmup, provider=provider, threads=threads,
                          thread_pool=thread_pool, torch=not no_torch, ort_moe=not no_ort_moe,
                          strategy=strategy, seed=seed)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    if sweep:
        _sweep(cfg, widths, d_max, sweep_configs, out_prefix, seed, quiet)
        return
    if synthetic:
        from modrt import synthetic as synth

        d = _ints(dims, "--dims", 3)
        if not 1 <= k <= modules:
            raise InputError(f"need 1 <= --k ({k}) <= --modules ({modules})")
        with tempfile.TemporaryDirectory(prefix="modrt-bench-") as tmp:
            if not quiet:
                click.echo(f"building a synthetic bundle M={modules} K={k} dims={dims} ...", err=True)
            synth.build(tmp, modules=modules, k=k, dims=d, seed=seed, combine=combine)
            report = run(tmp, cfg, {"synthetic": True, "dims": list(d), "seed": seed}, not quiet)
    else:
        report = run(bundle_dir, cfg, None, not quiet)
    click.echo(format_table(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1))
        click.echo(f"wrote {json_path}", err=True)


def _sweep(cfg: BenchConfig, widths: str, d_max: int, configs: str, out_prefix: str, seed: int,
           quiet: bool) -> None:
    from modrt import sweep as sw

    pairs = []
    for item in configs.split(","):
        try:
            M, K = (int(v) for v in item.split(":"))
        except ValueError:
            raise InputError(f"--sweep-configs must be M:K pairs like 16:1,15:3, got {configs!r}") from None
        pairs.append((M, K))
    try:
        scfg = sw.SweepConfig(widths=_ints(widths, "--widths"), configs=tuple(pairs), d_max=d_max, seed=seed)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    out = Path(out_prefix)
    if not out.parent.is_dir():
        raise InputError(f"--out {out_prefix}: directory {out.parent} does not exist")
    rows = sw.run(scfg, cfg, log=(lambda line: None) if quiet else (lambda line: click.echo(line, err=True)))
    click.echo(sw.summary(rows))
    csv_path = sw.write_csv(rows, out.with_name(out.name + ".csv"))
    click.echo(f"wrote {csv_path}", err=True)
    title = (f"modrt bench --sweep: p50 latency ratios, {cfg.strategy} strategy, "
             f"{_cpu_count()} CPU threads, onnxruntime")
    png = sw.plot(rows, out.with_name(out.name + ".png"), title=_title(title))
    click.echo(f"wrote {png}", err=True)


def _cpu_count() -> int:
    from modrt.runtime.sessions import cores

    return cores()


def _title(text: str) -> str:
    import onnxruntime

    return f"{text} {onnxruntime.__version__}"


__all__ = ["BenchConfig", "STRATEGY", "bench", "format_table", "measure", "run", "stats"]
