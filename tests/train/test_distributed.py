"""Training on several processes (``torchrun -m modrt.train``), as a user launches it.

The targets (issue "Past one machine"): a 2-process gloo run's losses for the first 20
steps equal the 1-process run's at the same global batch (EM and dense; EM's draws keyed
by example), a 2-process checkpoint resumes on 1 process and on 2, a dying process stops
the run with one line and leaves the last good checkpoint, a world size that cannot split
the batch is a usage error naming the sizes that can.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from modrt.train import distributed, routing
from modrt.train.methods.base import Window

# Dropout 0: dropout masks are drawn per process (train/distributed.py says what is equal).
SIZES = ["--embedding", "16", "--hidden", "16", "--dropout", "0", "--batch-size", "8", "--bptt", "10",
         "--eval-batch-size", "512", "--log-every", "1", "--seed", "3", "--device", "cpu", "--quiet"]
RUN = ["--modules", "4", "--k", "1", "--samples", "4", "--e-step-every", "2", *SIZES]


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def train(procs: int, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m modrt.train ...`` (one process) or ``torchrun --nproc-per-node N -m modrt.train ...``."""
    launcher = ([sys.executable, "-m", "modrt.train"] if procs == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
                 "-m", "modrt.train"])
    return subprocess.run([*launcher, *map(str, args)], env=_env(), capture_output=True, text=True, timeout=timeout)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def losses(out: Path) -> list[tuple[int, float]]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return [(r["step"], r["loss"]) for r in recs if r["kind"] == "train"]


def assert_same_losses(a: list[tuple[int, float]], b: list[tuple[int, float]], steps: int) -> float:
    assert [s for s, _ in a] == list(range(1, steps + 1)) == [s for s, _ in b]
    worst = max(abs(x - y) for (_, x), (_, y) in zip(a, b, strict=True))
    assert worst <= 1e-4, (a, b)
    return worst


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


# --------------------------------------------------------------------- keyed draws


def test_mix_is_splitmix64():
    """``routing.mix`` is splitmix64's finaliser in wrapping int64 arithmetic."""
    mask = (1 << 64) - 1

    def reference(x: int) -> int:
        x &= mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    xs = [0, 1, 2, 3, -1, 2**62 + 12345, -(2**63)]
    got = routing.mix(torch.tensor(xs)).tolist()
    assert [g & mask for g in got] == [reference(x) for x in xs]


def test_keyed_draws_follow_the_controller_and_ignore_the_batch():
    """A row's draw depends on its key and probabilities only: the same examples drawn in
    another batch (another split over processes) get the same modules; over many keys
    the draws follow the controller's probabilities."""
    p = torch.tensor([0.05, 0.15, 0.5, 0.3])
    lp = p.log().view(1, 1, 4).expand(100_000, 2, 4)
    keys = routing.key(7, 0, torch.arange(100_000))
    a = routing.sample_keyed(lp, keys)
    freq = torch.bincount(a.flatten(), minlength=4).double() / a.numel()
    assert torch.allclose(freq, p.double(), atol=0.005), freq
    assert (a[:, 0] != a[:, 1]).float().mean() > 0.5  # the slots draw apart
    # rows 10..19 alone, and inside another batch, and in reverse order
    part = routing.sample_keyed(lp[:10], keys[10:20])
    assert torch.equal(part, a[10:20])
    assert torch.equal(routing.sample_keyed(lp[:10], keys[10:20].flip(0)), a[10:20].flip(0))
    assert not torch.equal(routing.sample_keyed(lp, routing.key(8, 0, torch.arange(100_000))), a)


def test_window_rows_are_global_example_indices():
    """A process's share of a window (streams 4..7 of 8) keys the a* memory by the global
    example index n = window * B + stream."""
    x = torch.zeros(5, 4, dtype=torch.long)
    w = Window(x, x, torch.zeros(4, 3), 3, 0, 0, first=4, streams=8)
    assert w.rows == slice(28, 32)
    assert w.ids.tolist() == [28, 29, 30, 31]
    assert Window(x, x, None, 3, 0, 0).rows == slice(12, 16)  # one process: its own B


def test_one_process_world_is_the_identity():
    one = distributed.SINGLE
    t = torch.arange(6.0)
    assert one.sum_(t) is t and one.cat(t) is t
    ids, values = one.cat_rows(torch.tensor([3, 1]), torch.ones(2, 5))
    assert ids.tolist() == [3, 1] and values.shape == (2, 5)
    assert [distributed.World(r, 3).split(10) for r in range(3)] == [slice(0, 3), slice(3, 6), slice(6, 10)]
    assert distributed.allowed_sizes(12) == [1, 2, 3, 4, 6, 12]


# --------------------------------------------------------------------- torchrun, for real


def test_two_processes_train_as_one_and_resume_on_either(ptb_dir, tmp_path):
    """EM, 20 steps: 2 gloo processes log the losses one process logs (≤ 1e-4); the
    a* memory in the checkpoint is the same; a 2-process checkpoint of step 10 continues
    on 1 process and on 2 to the same losses, memory and weights."""
    one, two = tmp_path / "one", tmp_path / "two"
    ok(train(1, "ptb", *RUN, "--method", "em", "--steps", 20, "--data", ptb_dir, "--out", one))
    p = ok(train(2, "ptb", *RUN, "--method", "em", "--steps", 10, "--data", ptb_dir, "--out", two))
    assert "on 2 processes (gloo" in p.stderr
    assert p.stdout.count("done:") == 1  # rank 0 speaks
    ck = load(two / "ckpt.pt")
    assert ck["world_size"] == 2 and ck["hidden"].shape == (8, 16)  # every stream's state
    on1, on2 = tmp_path / "on1", tmp_path / "on2"
    for d in (on1, on2):
        d.mkdir()
        (d / "ckpt.pt").write_bytes((two / "ckpt.pt").read_bytes())
    ok(train(1, "ptb", "--resume", on1 / "ckpt.pt", "--steps", 20, "--data", ptb_dir, "--quiet"))
    ok(train(2, "ptb", "--resume", on2 / "ckpt.pt", "--steps", 20, "--data", ptb_dir, "--quiet"))
    want = losses(one)
    print("EM, 1 vs 2 processes, max |loss diff| over steps 1-10:",
          assert_same_losses(want[:10], losses(two), 10))
    ref = load(one / "ckpt.pt")
    for d in (on1, on2):
        print(d.name, "(resumed at step 10), max |loss diff| over steps 1-20:", assert_same_losses(want, losses(d), 20))
        got = load(d / "ckpt.pt")
        assert torch.equal(got["method"]["memory"], ref["method"]["memory"])
        for name, tensor in ref["model"].items():
            assert torch.allclose(got["model"][name], tensor, atol=1e-5), name
        assert torch.allclose(got["hidden"], ref["hidden"], atol=1e-5)


def test_dense_two_processes_train_as_one(ptb_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    dense = ["--modules", "1", "--k", "1", *SIZES]
    ok(train(1, "ptb", *dense, "--method", "dense", "--steps", 20, "--data", ptb_dir, "--out", one))
    ok(train(2, "ptb", *dense, "--method", "dense", "--steps", 20, "--data", ptb_dir, "--out", two))
    print("dense, 1 vs 2 processes, max |loss diff|:", assert_same_losses(losses(one), losses(two), 20))


def test_a_world_size_that_cannot_split_the_streams_is_a_usage_error(ptb_dir, tmp_path):
    p = train(3, "ptb", *RUN, "--steps", 5, "--data", ptb_dir, "--out", tmp_path / "r")
    assert p.returncode != 0
    line = ("Error: 3 processes cannot split --batch-size 8 streams evenly (each process owns whole streams): "
            "run 1, 2, 4 or 8 processes, or change --batch-size")
    assert p.stderr.count(line) == 1, p.stderr  # rank 0 says it; the others exit quietly
    assert "[rank" not in p.stderr  # no process's traceback
    assert not (tmp_path / "r" / "ckpt.pt").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_process_that_dies_stops_the_run_with_one_line(ptb_dir, tmp_path):
    """Two processes started as torchrun starts them (its environment variables); rank 1
    is killed after a checkpoint: rank 0 stops with one line naming the checkpoint, which
    loads and continues."""
    out, port = tmp_path / "run", _free_port()
    args = [sys.executable, "-m", "modrt.train", "ptb", *RUN, "--steps", 100_000, "--ckpt-every", 5,
            "--data", ptb_dir, "--out", out]
    procs = [subprocess.Popen(list(map(str, args)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port)))
             for r in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not (out / "ckpt.pt").exists():
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].stderr.read()
            time.sleep(0.2)
        time.sleep(1.0)
        procs[1].send_signal(signal.SIGKILL)
        _, err = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 1, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("error: rank 0: another process of this run stopped at step ")
    assert f"the last good checkpoint is {out / 'ckpt.pt'} (continue with --resume" in errors[0]
    ck = load(out / "ckpt.pt")
    assert ck["step"] % 5 == 0 and ck["step"] >= 5
    ok(train(1, "ptb", "--resume", out / "ckpt.pt", "--steps", ck["step"] + 2, "--data", ptb_dir, "--quiet"))
    assert losses(out)[-1][0] == ck["step"] + 2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL across processes needs 2 CUDA devices "
                                                           f"(torch sees {torch.cuda.device_count()})")
def test_nccl_two_gpus_train_as_one(ptb_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    cuda = [a if a != "cpu" else "cuda" for a in RUN]
    ok(train(1, "ptb", *cuda, "--method", "em", "--steps", 20, "--data", ptb_dir, "--out", one))
    p = ok(train(2, "ptb", *cuda, "--method", "em", "--steps", 20, "--data", ptb_dir, "--out", two))
    assert "(nccl" in p.stderr
    assert_same_losses(losses(one), losses(two), 20)


IMAGE_WORKER = '''
import sys
from pathlib import Path

import numpy as np
import torch

from modrt.data.cifar10 import CIFAR10, CLASSES
from modrt.train import checkpoint, distributed
from modrt.train.config import ImageModelConfig, TrainConfig
from modrt.train.trainer import Trainer

out, steps = Path(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
labels = np.arange(40) % 10
images = np.clip((labels * 25)[:, None, None, None] + rng.integers(-20, 20, (40, 32, 32, 3)), 0, 255).astype(np.uint8)
data = CIFAR10(images, labels, images[:20], labels[:20], CLASSES, Path("tiny"))
world, device = distributed.init("cpu")
mcfg = ImageModelConfig(channels=(4, 4), modules=3, k=1, method="em")
tcfg = TrainConfig(device="cpu", batch_size=16, samples=3, e_step_every=1, log_every=1, steps=steps, epochs=3,
                   balance_rate=0.3, augment=True)
resume = checkpoint.load(out / "ckpt.pt") if (out / "ckpt.pt").exists() else None
t = Trainer(mcfg, tcfg, data, out, resume=resume, progress=False, world=world, device=device)
t.fit()
torch.save({"memory": t.method.memory, "bias": t.method.bias, "model": t.model.state_dict()},
           out / f"rank{world.rank}-of{world.size}.pt")
distributed.close(world)
'''


def test_images_split_over_two_processes_stay_one_model_and_memory(tmp_path):
    """CIFAR-10's path on 2 processes (a tiny data set built in the script): batch norm's
    statistics are per process, so the losses are not one process's; what must hold is
    that the processes stay one model with one a* memory and balancing bias, that rank 0's
    checkpoint is the whole run, and that it continues on one process."""
    script, out = tmp_path / "worker.py", tmp_path / "run"
    script.write_text(IMAGE_WORKER)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(script), str(out), "5"], env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1, ck = load(out / "rank0-of2.pt"), load(out / "rank1-of2.pt"), load(out / "ckpt.pt")
    # 5 steps of 16, 16, 8, 16, 16 images, each E-stepped: both ranks' rows in both memories
    assert torch.equal(r0["memory"], r1["memory"]) and torch.equal(r0["bias"], r1["bias"])
    assert torch.equal(ck["method"]["memory"], r0["memory"])
    assert r0["bias"].abs().sum() > 0  # balancing moved on the whole batch's a*
    for name, tensor in r0["model"].items():
        if "running" not in name and "num_batches" not in name:  # batch norm's statistics: per process
            assert torch.allclose(r1["model"][name], tensor, atol=1e-6), name
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4, 5] and ck["world_size"] == 2
    one = subprocess.run([sys.executable, str(script), str(out), "7"], env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4, 5, 6, 7]
    assert load(out / "ckpt.pt")["world_size"] == 1
