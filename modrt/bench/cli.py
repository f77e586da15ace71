"""``modrt bench``, the command: a bundle directory, ``--synthetic`` or ``--sweep``."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click

from modrt._cli_types import PROVIDER, STRATEGY, STRATEGY_HELP
from modrt._exceptions import InputError
from modrt.bench.report import format_table, run
from modrt.bench.timing import BenchConfig


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
@click.option("--against", type=click.Path(exists=True, file_okay=False), default=None,
              help="A second bundle of the same inputs (e.g. the float bundle an int8 one came from): its "
                   "routed and dense runs measured side by side, as ref_routed and ref_dense.")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The training checkpoint the bundle was exported from: PyTorch eager on that model is the "
                   "torch peer (PTB and CIFAR-10 bundles; needs torch).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def bench(bundle_dir: str | None, synthetic: bool, modules: int, k: int, dims: str, combine: str,
          batches: str, seq: int, seconds: float, warmup: int, provider: str, threads: int,
          thread_pool: str, strategy: str, no_torch: bool, no_ort_moe: bool, seed: int,
          json_path: str | None, sweep: bool, widths: str, d_max: int, sweep_configs: str,
          out_prefix: str, against: str | None, checkpoint: str | None, quiet: bool) -> None:
    """Measure routed vs dense vs peers on BUNDLE_DIR, on a --synthetic bundle, or --sweep widths.

    \b
    modrt bench out/ --batch 1,8,64
    modrt bench out-int8/ --against out/        # int8 and float, side by side
    modrt bench out/ --checkpoint ckpt.pt       # + PyTorch eager on the trained model
    modrt bench --synthetic --modules 16 --k 1 --dims 1024,4096,1024 --json bench.json
    modrt bench --sweep --widths 64,256,1024,4096 --out results/sweep
    """
    if sweep and (bundle_dir or synthetic):
        raise InputError("--sweep builds its own bundles: give neither a bundle directory nor --synthetic")
    if checkpoint and (sweep or synthetic):
        raise InputError("--checkpoint goes with a bundle directory (the bundle exported from it)")
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
        report = run(bundle_dir, cfg, None, not quiet, against=against, checkpoint=checkpoint)
    click.echo(format_table(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1))
        click.echo(f"wrote {json_path}", err=True)


def _sweep(cfg: BenchConfig, widths: str, d_max: int, configs: str, out_prefix: str, seed: int,
           quiet: bool) -> None:
    from modrt.bench import sweep as sw

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


__all__ = ["bench"]
