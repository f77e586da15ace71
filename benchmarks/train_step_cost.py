"""Cost of one EM training step (E-step amortised) vs one dense step of equal active width.

Both trainers run on the same PTB windows in one process, interleaved in rounds of
``e_step_every`` steps so machine noise hits both alike; the ratio is what to read.

    python benchmarks/train_step_cost.py --modules 15 --k 1 --rounds 6
    python benchmarks/train_step_cost.py --size small --e-step position --samples 4 --balance-rate 0.3
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import torch

from modrt.data import ptb
from modrt.train.config import E_STEPS, ModelConfig, TrainConfig
from modrt.train.trainer import Trainer


@click.command()
@click.option("--modules", default=15, show_default=True)
@click.option("--k", default=1, show_default=True)
@click.option("--rounds", default=6, show_default=True, help="Rounds of e_step_every steps each.")
@click.option("--e-step-every", default=TrainConfig.e_step_every, show_default=True)
@click.option("--samples", default=TrainConfig.samples, show_default=True)
@click.option("--e-step-dtype", type=click.Choice(["float32", "bfloat16"]), default=TrainConfig.e_step_dtype,
              show_default=True)
@click.option("--e-step", type=click.Choice(E_STEPS), default=TrainConfig.e_step, show_default=True)
@click.option("--prior-weight", default=1.0, show_default=True, help="The E-step score's prior weight.")
@click.option("--balance-rate", default=0.0, show_default=True)
@click.option("--size", type=click.Choice(["default", "small"]), default="default", show_default=True,
              help="small: E=H=32, no dropout (the capacity-limited protocol).")
@click.option("--threads", default=0, help="torch threads (0: torch's default).")
@click.option("--data", default=None, help="PTB directory.")
def main(modules: int, k: int, rounds: int, e_step_every: int, samples: int, e_step_dtype: str, e_step: str,
         prior_weight: float, balance_rate: float, size: str, threads: int, data: str | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    corpus = ptb.load(data)
    tcfg = TrainConfig(device="cpu", e_step_every=e_step_every, samples=samples, e_step_dtype=e_step_dtype,
                       e_step=e_step, prior_weight=prior_weight, balance_rate=balance_rate)
    dims = {"embedding": 32, "hidden": 32, "dropout": 0.0} if size == "small" else {}
    scratch = Path(tempfile.mkdtemp(prefix="modrt-bench-"))  # the trainers write nothing unless saved
    em = Trainer(ModelConfig(modules=modules, k=k, **dims), tcfg, corpus, scratch / "em", progress=False)
    dense = Trainer(ModelConfig(modules=k, k=k, method="dense", **dims), tcfg, corpus, scratch / "dense",
                    progress=False)
    times = {"em": 0.0, "dense": 0.0}
    steps = {"em": 0, "dense": 0}

    def run(name: str, tr: Trainer, n: int, count: bool) -> None:
        t0 = time.perf_counter()
        for _ in range(n):
            tr.train_step()
            tr.step += 1
            tr.window += 1
        if count:
            times[name] += time.perf_counter() - t0
            steps[name] += n

    n = tcfg.e_step_every * -(-5 // tcfg.e_step_every)  # steps per round: whole E-step periods
    run("em", em, n, False)  # warm-up round
    run("dense", dense, n, False)
    for _ in range(rounds):
        run("em", em, n, True)
        run("dense", dense, n, True)
    per = {k_: times[k_] / steps[k_] for k_ in times}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, B={tcfg.batch_size} T={tcfg.bptt} "
          f"E={em.mcfg.embedding} H={em.mcfg.hidden} S={tcfg.samples} e_step_every={tcfg.e_step_every} "
          f"e_step={tcfg.e_step} e_step_dtype={tcfg.e_step_dtype} balance_rate={tcfg.balance_rate}")
    print(f"EM M={modules} K={k}: {per['em'] * 1e3:.1f} ms/step ({1 / per['em']:.2f} steps/s, E-step amortised)")
    print(f"dense M=K={k}:    {per['dense'] * 1e3:.1f} ms/step ({1 / per['dense']:.2f} steps/s)")
    print(f"ratio EM/dense: {per['em'] / per['dense']:.2f}x")


if __name__ == "__main__":
    main()
