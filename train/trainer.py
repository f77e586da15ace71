"""The training loop: EM (or a baseline) over a task's batches, with checkpoints.

One loop for every task (``tasks``: PTB windows, CIFAR-10 images) and method (``methods``:
EM, REINFORCE, noisy top-k, hash, dense). One step = one batch through the run's method,
which returns its losses (EM runs its E-step there when due), then one gradient step on
their sum. PTB's hidden state carries across windows and restarts at each epoch.
An evaluation after every epoch (PTB: valid perplexity; images: test accuracy and the
train accuracy of a fixed subset), the final figures at the end. ``metrics.jsonl`` gets one
line per log interval and per evaluation; ``ckpt.pt`` is written at epoch ends, every
``ckpt_every`` steps, on Ctrl-C / SIGTERM and at the end, and holds everything to continue
exactly.

On several processes (``torchrun``; ``distributed``) the same loop runs on every rank over
its share of each batch; the gradient goes through DDP, the logged figures are the global
batch's, and rank 0 alone evaluates, writes and shows progress.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from modrt._exceptions import TrainingError
from modrt.train import checkpoint, distributed, methods, tasks
from modrt.train import model as lm
from modrt.train.config import ImageModelConfig, ModelConfig, TrainConfig
from modrt.train.distributed import resolve_device
from modrt.train.tasks import evaluate  # noqa: F401 - PTB perplexity, imported from here by callers


class _Interval:
    """Accumulates one log interval's statistics (saved in checkpoints for exact resume)."""

    def __init__(self, modules: int, state: dict[str, Any] | None = None):
        s = state or {}
        self.nll = s.get("nll", 0.0)
        self.ctrl = s.get("ctrl", 0.0)
        self.steps = s.get("steps", 0)
        self.ent_ex = s.get("ent_ex", 0.0)
        self.ent_b = s.get("ent_b", 0.0)
        self.usage = s.get("usage", torch.zeros(modules, dtype=torch.long)).clone()
        self.e_changed = s.get("e_changed", 0)
        self.e_total = s.get("e_total", 0)
        self.seconds = s.get("seconds", 0.0)
        self.correct = s.get("correct", 0)  # images: training accuracy of the interval's batches
        self.count = s.get("count", 0)

    def state(self) -> dict[str, Any]:
        return dict(nll=self.nll, ctrl=self.ctrl, steps=self.steps, ent_ex=self.ent_ex,
                    ent_b=self.ent_b, usage=self.usage, e_changed=self.e_changed,
                    e_total=self.e_total, seconds=self.seconds, correct=self.correct, count=self.count)

    def record(self, step: int, epoch: int) -> dict[str, Any]:
        n = max(self.steps, 1)
        loss = self.nll / n
        acc = {"acc": round(self.correct / self.count, 5)} if self.count else {}
        return {
            "kind": "train",
            "step": step,
            "epoch": epoch,
            "loss": round(loss, 5),
            "ppl": round(math.exp(min(loss, 50.0)), 3),
            "controller_loss": round(self.ctrl / n, 5),
            "exp_entropy_example": round(math.exp(self.ent_ex / n), 4),
            "exp_entropy_batch": round(math.exp(self.ent_b / n), 4),
            "module_usage": self.usage.tolist(),
            "e_step_improved": round(self.e_changed / self.e_total, 4) if self.e_total else None,
            "steps_per_s": round(self.steps / self.seconds, 3) if self.seconds else None,
            **acc,
        }


class Trainer:
    def __init__(self, model_cfg: ModelConfig | ImageModelConfig, train_cfg: TrainConfig, dataset,
                 out: Path, resume: dict[str, Any] | None = None, progress: bool = True,
                 world: distributed.World | None = None, device: torch.device | None = None):
        """``dataset``: a PTB ``Corpus`` for a ``ModelConfig``, a ``CIFAR10`` for an
        ``ImageModelConfig``. ``world``/``device``: this process's rank and device when
        torchrun started several (``distributed.init``); None: one process."""
        self.world = world or distributed.SINGLE
        self.mcfg, self.tcfg, self.out = model_cfg, train_cfg, Path(out)
        self.progress = progress and self.world.main
        self.device = device or resolve_device(train_cfg.device)
        torch.manual_seed(train_cfg.seed)
        random.seed(train_cfg.seed)
        np.random.seed(train_cfg.seed)
        self.task = tasks.build(model_cfg, dataset, train_cfg, self.device, self.world)
        self.model = self.task.build_model().to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=train_cfg.lr)
        self.method = self.task.build_method(self.model)
        self.method.world = self.world
        self.step = self.epoch = self.window = 0
        self.hidden = self.task.initial_carry(self.model)  # PTB: the recurrent state; images: None
        self.metrics: list[dict[str, Any]] = []
        self.interval = _Interval(model_cfg.modules)
        self.seconds_before = 0.0  # wall time of earlier sessions of this run (resume)
        self._session_start = time.perf_counter()
        if resume is not None:
            self._restore(resume)
        self.ddp = distributed.wrap(self.model, self.world)  # None for one process
        self._stop_signal: int | None = None

    @property
    def windows(self) -> int:
        """Batches per epoch (PTB: windows)."""
        return self.task.batches

    # ---- checkpoints -------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "model_config": asdict(self.mcfg),
            "train_config": asdict(self.tcfg),
            **self.task.meta(),
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "method": self.method.state(),
            "step": self.step,
            "epoch": self.epoch,
            "window": self.window,
            # PTB: the state of all B streams (every process's share, in stream order).
            "hidden": None if self.hidden is None else self.world.cat(self.hidden.detach()).cpu(),
            "world_size": self.world.size,
            "interval": self.interval.state(),
            "rng": checkpoint.rng_state(),
            "metrics": self.metrics,
            "seconds": self.elapsed(),
        }

    def elapsed(self) -> float:
        """Wall seconds this run has trained, over all its sessions."""
        return self.seconds_before + time.perf_counter() - self._session_start

    def save(self) -> Path:
        """Every process takes part (the state's exchanges); rank 0 writes."""
        path = self.out / "ckpt.pt"
        state = self.state()
        if self.world.main:
            checkpoint.save(path, state)
        return path

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.task.check_resume(ckpt)
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.method.load_state(ckpt["method"])
        self.step, self.epoch, self.window = ckpt["step"], ckpt["epoch"], ckpt["window"]
        hidden = ckpt["hidden"]  # all B streams: this process's share of them
        self.hidden = None if hidden is None else hidden[self.world.split(hidden.shape[0])].to(self.device)
        self.interval = _Interval(self.mcfg.modules, ckpt["interval"])
        self.metrics = list(ckpt["metrics"])
        self.seconds_before = float(ckpt.get("seconds", 0.0))
        checkpoint.set_rng_state(ckpt["rng"])
        # metrics.jsonl restarts from what the checkpoint knew: no duplicated lines.
        if not self.world.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "w") as f:
            for m in self.metrics:
                f.write(json.dumps(m) + "\n")

    def _log(self, record: dict[str, Any]) -> None:
        self.metrics.append(record)
        if not self.world.main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # ---- one step ----------------------------------------------------------------
    def train_step(self) -> float:
        """One batch -> the method's losses -> backward -> optimiser step -> log.
        Returns the step's nll."""
        tc = self.tcfg
        t0 = time.perf_counter()
        w = self.task.batch(self.window, self.epoch, self.step, self.hidden)
        m = self.method.losses(w)
        self.opt.zero_grad(set_to_none=True)
        weight = self.task.weight(w)  # 1 on one process; DDP averages the processes' gradients
        (m.total * weight if weight != 1.0 else m.total).backward()
        st = methods.stats(m.out, self.mcfg.modules, self.world)
        self._drop_unused_grads(st["usage"])
        if tc.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.clip)
        self.opt.step()
        self.method.after_step(w, m)
        self.hidden = self.task.carry(m.out)
        acc = self.task.batch_stats(m.out, w)
        # The step's figures, of the whole batch: one exchange on several processes (and the
        # stop request, so that every process stops after the same step).
        W = self.world.size
        figures = torch.tensor([m.nll.item() * weight / W, m.auxiliary.item() * weight / W,
                                m.info.get("e_changed", 0), m.info.get("e_total", 0),
                                acc.get("correct", 0), acc.get("count", 0),
                                float(self._stop_signal is not None)], dtype=torch.float64)
        if W > 1:
            figures = self.world.sum_(figures.to(self.device)).cpu()
            if figures[6] > 0 and self._stop_signal is None:
                self._stop_signal = signal.SIGTERM
        nll, ctrl = float(figures[0]), float(figures[1])
        iv = self.interval
        iv.nll += nll
        iv.ctrl += ctrl
        iv.ent_ex += float(st["entropy_example"])
        iv.ent_b += float(st["entropy_batch"])
        iv.usage += st["usage"].cpu()
        iv.e_changed += int(figures[2])
        iv.e_total += int(figures[3])
        iv.correct += int(figures[4])
        iv.count += int(figures[5])
        iv.steps += 1
        iv.seconds += time.perf_counter() - t0
        return nll

    def _drop_unused_grads(self, usage: torch.Tensor) -> None:
        """A module no row selected in this window gets no gradient (None, as when rows are
        dispatched to modules), so Adam leaves it alone, also when the layer computed every
        module and masked (``ModularGRU.compute_all``: there its gradient is exactly 0)."""
        if not isinstance(self.model, lm.ModularLM) or not self.model.layer.compute_all:
            return
        for m in (usage == 0).nonzero().flatten().tolist():
            for p in self.model.layer.cells[m].parameters():
                p.grad = None

    def _checked_step(self) -> float:
        """``train_step``, stopping with one clear error when the numbers go non-finite (a
        NaN loss, or the controller's probabilities, which ``torch.multinomial`` rejects)
        before anything is saved: the checkpoint on disk stays the last good one."""
        try:
            loss = self.train_step()
        except RuntimeError as exc:
            if self.world.size > 1 and distributed.is_peer_failure(exc):
                raise  # fit says it in one line
            if "inf" not in str(exc) and "nan" not in str(exc):
                raise
            raise self._diverged(str(exc).splitlines()[0]) from exc
        if not math.isfinite(loss):
            raise self._diverged(f"the training loss is {loss}")
        return loss

    def _diverged(self, what: str) -> TrainingError:
        ckpt = self.out / "ckpt.pt"
        kept = f"the last good checkpoint is {ckpt}" if ckpt.exists() else "no checkpoint was saved"
        hint = "a lower --lr or a tighter --clip"
        if self.mcfg.combine == "sum" and self.mcfg.k > 1:
            k = self.mcfg.k
            hint = f"--combine mean (with sum, {k} GRU states add up, so the state can grow {k}-fold a step)"
        return TrainingError(f"training diverged at step {self.step + 1} ({what}); {kept}. Try {hint}.")

    # ---- the loop ----------------------------------------------------------------
    def total_steps(self) -> int:
        total = self.tcfg.epochs * self.windows
        return min(total, self.tcfg.steps) if self.tcfg.steps else total

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum
        # A second Ctrl-C interrupts at once (the checkpoint on disk stays whole).
        signal.signal(signum, signal.default_int_handler)

    def fit(self) -> dict[str, Any]:
        """Train to the end (or a stop request); on several processes, a process that goes
        away stops this one with one line (``TrainingError``), the checkpoint kept."""
        try:
            return self._fit()
        except Exception as exc:
            if self.world.size == 1 or not distributed.is_peer_failure(exc):
                raise
            ckpt = self.out / "ckpt.pt"
            kept = (f"the last good checkpoint is {ckpt} (continue with --resume {ckpt})" if ckpt.exists()
                    else "no checkpoint was saved")
            raise distributed.PeerStopped(f"rank {self.world.rank}: another process of this run stopped at step "
                                          f"{self.step + 1} ({distributed.reason(exc)}); {kept}") from exc

    def _fit(self) -> dict[str, Any]:
        tc = self.tcfg
        self.out.mkdir(parents=True, exist_ok=True)
        total = self.total_steps()
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self._session_start = time.perf_counter()
        self.losses: list[float] = []
        bar = tqdm(total=total, initial=self.step, disable=not self.progress, unit="step",
                   desc=f"{self.mcfg.method} M={self.mcfg.modules} K={self.mcfg.k}", dynamic_ncols=True)
        try:
            while self.step < total and self.epoch < tc.epochs:
                if self.window == 0:
                    self.hidden = self.task.initial_carry(self.model)
                self.losses.append(self._checked_step())
                self.step += 1
                self.window += 1
                bar.update(1)
                if self.step % tc.log_every == 0:
                    rec = self.interval.record(self.step, self.epoch)
                    self._log(rec)
                    self.interval = _Interval(self.mcfg.modules)
                    shown = {"acc": f"{rec['acc']:.3f}"} if "acc" in rec else {"ppl": f"{rec['ppl']:.1f}"}
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", **shown, expH_batch=f"{rec['exp_entropy_batch']:.2f}")
                if self.window == self.windows:  # epoch end: validate (rank 0), checkpoint
                    self.epoch += 1
                    self.window = 0
                    if self.world.main:
                        rec = self.task.validate(self.model)
                        self._log({"kind": "valid", "step": self.step, "epoch": self.epoch, **rec})
                        bar.write(f"epoch {self.epoch}: {self.task.describe(rec)}")
                    self.save()
                elif tc.ckpt_every and self.step % tc.ckpt_every == 0:
                    self.save()
                if self._stop_signal is not None:
                    self.save()
                    bar.close()
                    return {"stopped": True, "step": self.step, "checkpoint": str(self.out / "ckpt.pt")}
        finally:
            bar.close()
            for s, h in handlers.items():
                signal.signal(s, h)
        if self.interval.steps:
            self._log(self.interval.record(self.step, self.epoch))
            self.interval = _Interval(self.mcfg.modules)
        final = self.task.final(self.model) if self.world.main else {}
        summary = {"kind": "test", "step": self.step, "epoch": self.epoch, **final,
                   "minutes": round(self.elapsed() / 60, 2), "seconds": round(self.elapsed(), 3)}
        self._log(summary)
        self.save()
        return summary
