"""Training steps/s on one process against torchrun's N processes, the same run otherwise.

Each configuration trains ``--steps`` steps of the same run (global batch B, seed, sizes)
from scratch, one after the other in this one invocation, and reports the steps/s that
metrics.jsonl logged (train-step time only: no data loading, evaluation or start-up),
skipping the first ``--warmup`` steps. One process gets ``--threads`` threads; each of the
N processes gets threads / N (so both use the same cores). The losses of the two runs are
compared too: with dropout 0 they are equal (tests/train/test_distributed.py).

    python benchmarks/ddp_speed.py --procs 2 --steps 40 --method em
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import click


def _run(procs: int, threads: int, args: list[str], out: Path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(max(1, threads // procs))
    launcher = ([sys.executable, "-m", "modrt.train"] if procs == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
                 "-m", "modrt.train"])
    cmd = [*launcher, "ptb", *args, "--out", str(out), "--threads", str(max(1, threads // procs))]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise click.ClickException(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in recs if r["kind"] == "train"]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--procs", type=click.IntRange(min=2), default=2, show_default=True, help="N, torchrun's processes.")
@click.option("--threads", type=click.IntRange(min=1), default=os.cpu_count() or 1, show_default=True,
              help="Cores for each configuration (one process: all; N processes: threads / N each).")
@click.option("--steps", type=click.IntRange(min=2), default=40, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True)
@click.option("--method", type=click.Choice(["em", "dense"]), default="em", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
def main(procs: int, threads: int, steps: int, warmup: int, method: str, batch_size: int) -> None:
    """One process vs N processes: training steps/s, side by side."""
    args = ["--method", method, "--steps", str(steps), "--log-every", "1", "--dropout", "0", "--quiet",
            "--batch-size", str(batch_size), "--eval-batch-size", "512"]
    if method == "dense":
        args += ["--modules", "1"]
    with tempfile.TemporaryDirectory() as tmp:
        one = _run(1, threads, args, Path(tmp) / "one")
        many = _run(procs, threads, args, Path(tmp) / "many")

    def rate(recs: list[dict]) -> float:
        timed = [1.0 / r["steps_per_s"] for r in recs[warmup:] if r["steps_per_s"]]
        return len(timed) / sum(timed)

    r1, rn = rate(one), rate(many)
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(one, many, strict=True))
    click.echo(f"PTB {method}, global batch {batch_size}, {steps} steps ({warmup} warm-up), {threads} cores")
    click.echo("| configuration | steps/s | x one process |\n|---|---|---|")
    click.echo(f"| 1 process, {threads} threads | {r1:.3f} | 1.00 |")
    click.echo(f"| {procs} processes (gloo), {max(1, threads // procs)} thread each | {rn:.3f} | {rn / r1:.2f} |")
    click.echo(f"max |loss diff| over the {steps} steps: {diff:.1e}")


if __name__ == "__main__":
    main()
