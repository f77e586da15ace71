"""``modrt`` and ``modrt train ptb`` as a user runs them: real subprocesses, exit codes, stderr."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from modrt.train.trainer import Trainer

TINY = ["--embedding", "8", "--hidden", "16", "--modules", "3", "--k", "1", "--bptt", "5",
        "--batch-size", "4", "--eval-batch-size", "512", "--samples", "2", "--e-step-every", "2",
        "--log-every", "1", "--device", "cpu", "--quiet"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MODRT_DATA", None)
    return env


def modrt(*args, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modrt", *map(str, args)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def start(*args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "modrt", *map(str, args)], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_error_line(p: subprocess.CompletedProcess) -> str:
    """The run failed with exit 1 and said why in one 'error:' line, no traceback."""
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def train_records(metrics: Path) -> list[dict]:
    if not metrics.exists():
        return []
    lines = metrics.read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if r["kind"] == "train"]


def wait_for_steps(proc: subprocess.Popen, metrics: Path, last_step: int,
                   timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            recs = train_records(metrics)
        except json.JSONDecodeError:  # a line being written
            recs = []
        if recs and recs[-1]["step"] >= last_step:
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {last_step} in {metrics} after {timeout} s")


def interrupt(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        return proc.returncode, out, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A real checkpoint of a tiny model (hidden 16), trained two steps on a tiny corpus."""
    from modrt.data.ptb import Corpus
    from modrt.train.config import ModelConfig, TrainConfig

    out = tmp_path_factory.mktemp("tiny-run")
    tok = torch.arange(200).remainder(10).numpy()
    corpus = Corpus(vocab=tuple(f"w{i}" for i in range(10)), train=tok, valid=tok[:20],
                    test=tok[:20], directory=out)
    mcfg = ModelConfig(vocab_size=10, embedding=8, hidden=16, modules=3, k=1)
    tcfg = TrainConfig(bptt=5, batch_size=4, eval_batch_size=2, steps=2, device="cpu", log_every=1)
    Trainer(mcfg, tcfg, corpus, out, progress=False).fit()
    return out / "ckpt.pt"


# ---- help, without torch --------------------------------------------------------------

@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["train", "ptb", "--help"]])
def test_help(tmp_path, args):
    p = modrt(*args, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "Usage: modrt" in p.stdout


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["train", "ptb", "--help"]])
def test_help_does_not_import_torch(tmp_path, args):
    code = (
        "import sys, modrt.cli\n"
        f"rc = modrt.cli.cli.main({args!r}, prog_name='modrt', standalone_mode=False)\n"
        "assert rc in (0, None), rc\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print('ok')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith("ok")


def test_train_ptb_help_lists_every_config_field(tmp_path):
    from dataclasses import fields

    from modrt.train.config import ModelConfig, TrainConfig

    help_text = modrt("train", "ptb", "--help", cwd=tmp_path).stdout
    not_options = {"vocab_size", "task", "augment"}  # set by the task, or an image-only field
    for f in [*fields(ModelConfig), *fields(TrainConfig)]:
        if f.name not in not_options:
            assert f"--{f.name.replace('_', '-')}" in help_text, f.name


def test_train_cifar10_help_lists_every_field_it_uses(tmp_path):
    from dataclasses import fields

    from modrt.train.config import ImageModelConfig, TrainConfig

    help_text = modrt("train", "cifar10", "--help", cwd=tmp_path).stdout
    # Set by the task or the data (classes, image size, normalisation), or PTB's alone.
    not_options = {"task", "classes", "in_channels", "image", "mean", "std", "bptt", "eval_batch_size", "e_step",
                   "e_step_dtype", "a_star_init"}
    for f in [*fields(ImageModelConfig), *fields(TrainConfig)]:
        if f.name not in not_options:
            assert f"--{f.name.replace('_', '-')}" in help_text, f.name
    assert "--size" in help_text and "demo" in help_text


# ---- usage errors: exit 2 ---------------------------------------------------------------

@pytest.mark.parametrize("args,says", [
    (["--k", "3", "--modules", "2"], "cannot exceed"),
    (["--hidden", "0"], "--hidden"),
    (["--method", "dense", "--modules", "3", "--k", "1"], "must equal"),
    (["--e-step-dtype", "float16"], "--e-step-dtype"),
    (["--e-step", "viterbi"], "--e-step"),
    (["--method", "reinforce", "--balance-rate", "0.1"], "--balance-rate is an EM option"),
    (["--method", "hash", "--e-step", "position"], "--e-step is an EM option"),
    (["--method", "dense", "--modules", "1", "--warm-start", "5"], "--warm-start is an EM option"),
    (["--method", "hash", "--a-star-init", "hash"], "--a-star-init is an EM option"),
    (["--a-star-init", "words"], "--a-star-init"),
    (["--warm-start", "-1"], "--warm-start"),
    (["--word-subsample", "0"], "needs --e-step word"),
    (["--e-step", "position", "--capacity", "1.2"], "needs --e-step word or window"),
    (["--e-step", "word", "--capacity", "0.5"], "a value >= 1"),
    (["--method", "hash", "--capacity", "1.2"], "--capacity is an EM option"),
])
def test_bad_options_exit_2(tmp_path, args, says):
    p = modrt("train", "ptb", *args, "--out", tmp_path / "run", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert says in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists()


# ---- user errors: exit 1, one line ------------------------------------------------------

def test_resume_random_bytes(tmp_path, ptb_dir):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(os.urandom(4096))
    line = one_error_line(modrt("train", "ptb", "--resume", bad, "--data", ptb_dir, cwd=tmp_path))
    assert "not a modrt checkpoint" in line


def test_resume_other_format_version(tmp_path, tiny_ckpt, ptb_dir):
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    for old in (99, 1):  # 1: before the methods' own state (``ckpt["method"]``)
        ckpt["version"] = old
        other = tmp_path / "ckpt.pt"
        torch.save(ckpt, other)
        line = one_error_line(modrt("train", "ptb", "--resume", other, "--data", ptb_dir, cwd=tmp_path))
        assert f"version {old}" in line and "reads version 2" in line


def test_resume_with_changed_architecture(tmp_path, tiny_ckpt, ptb_dir):
    p = modrt("train", "ptb", "--resume", tiny_ckpt, "--hidden", "32", "--data", ptb_dir,
              "--out", tmp_path / "run", cwd=tmp_path)
    line = one_error_line(p)
    assert "cannot continue" in line and "--hidden 32" in line


def test_out_under_a_regular_file(tmp_path, ptb_dir):
    (tmp_path / "file").write_text("")
    p = modrt("train", "ptb", *TINY, "--data", ptb_dir, "--out", tmp_path / "file" / "run",
              cwd=tmp_path)
    assert "--out" in one_error_line(p)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root may write into read-only directories")
def test_out_under_a_read_only_dir(tmp_path, ptb_dir):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        p = modrt("train", "ptb", *TINY, "--data", ptb_dir, "--out", ro / "run", cwd=tmp_path)
    finally:
        ro.chmod(0o755)
    assert "not writable" in one_error_line(p)


def test_data_without_ptb(tmp_path):
    (tmp_path / "nodata").mkdir()
    p = modrt("train", "ptb", *TINY, "--data", tmp_path / "nodata", "--out", tmp_path / "run",
              cwd=tmp_path)
    assert "no ptb.train.txt" in one_error_line(p)


def test_existing_run_needs_resume_or_force(tmp_path, tiny_ckpt, ptb_dir):
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt.pt").write_bytes(tiny_ckpt.read_bytes())
    p = modrt("train", "ptb", *TINY, "--data", ptb_dir, "--out", run, cwd=tmp_path)
    line = one_error_line(p)
    assert "--resume" in line and "--force" in line
    assert (run / "ckpt.pt").read_bytes() == tiny_ckpt.read_bytes()


def test_noisy_topk_refuses_combine(tmp_path):
    p = modrt("train", "ptb", "--method", "noisy-topk", "--k", "2", "--combine", "sum",
              "--out", tmp_path / "run", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "--combine does not apply to noisy-topk" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists()


# ---- real runs ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_run(tmp_path, ptb_dir, dtype):
    run = tmp_path / "run"
    p = modrt("train", "ptb", *TINY, "--steps", "3", "--data", ptb_dir, "--out", run, "--threads", "1",
              "--e-step-dtype", dtype, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("done: 3 steps")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["train"] * 3 + ["test"]
    assert 1 < records[-1]["test_ppl"] < 20_000
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and len(ckpt["vocab"]) == 10_000
    assert ckpt["model_config"]["hidden"] == 16
    assert ckpt["train_config"]["e_step_dtype"] == dtype


def test_ctrl_c_saves_and_resume_continues(tmp_path, ptb_dir):
    run = tmp_path / "run"
    metrics = run / "metrics.jsonl"
    proc = start("train", "ptb", *TINY, "--steps", "100000", "--data", ptb_dir, "--out", run,
                 cwd=tmp_path)
    wait_for_steps(proc, metrics, 3)
    rc, _, err = interrupt(proc)
    assert rc == 130, err
    assert "Traceback" not in err and "stopped at step" in err
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    stopped = ckpt["step"]
    assert stopped >= 3
    assert [r["step"] for r in train_records(metrics)] == list(range(1, stopped + 1))

    # Resume: the run goes on from the stopped step, metrics.jsonl keeps its lines once.
    proc = start("train", "ptb", "--resume", run / "ckpt.pt", "--data", ptb_dir, "--quiet",
                 cwd=tmp_path)
    wait_for_steps(proc, metrics, stopped + 2)
    rc, _, err = interrupt(proc)
    assert rc == 130, err
    again = torch.load(run / "ckpt.pt", weights_only=True)
    assert again["step"] >= stopped + 2
    assert [r["step"] for r in train_records(metrics)] == list(range(1, again["step"] + 1))
    assert again["train_config"] == ckpt["train_config"]


@pytest.mark.parametrize("args,want", [
    ([], ("em", 15, 1, "mean")),
    (["--method", "noisy-topk"], ("noisy-topk", 15, 4, "gate")),  # the paper's k=4
    (["--method", "noisy-topk", "-M", "5", "-K", "2"], ("noisy-topk", 5, 2, "gate")),
    (["--method", "dense", "-K", "3"], ("dense", 3, 3, "mean")),
    (["--method", "reinforce", "-K", "3"], ("reinforce", 15, 3, "mean")),
])
def test_method_defaults(args, want):
    from modrt.train.cli import _configs, ptb

    ctx = ptb.make_context("ptb", list(args))
    mcfg, _ = _configs(ctx.params)
    assert (mcfg.method, mcfg.modules, mcfg.k, mcfg.combine) == want


def test_a_busy_machine_gets_one_line_naming_threads(monkeypatch, capsys):
    from modrt.train import cli as train_cli

    monkeypatch.setattr(train_cli.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(train_cli.os, "getloadavg", lambda: (1.6, 1.5, 1.4))
    train_cli._warn_if_busy()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "load average 1.6 on 2 cores" in err and "--threads 1" in err
    monkeypatch.setattr(train_cli.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    train_cli._warn_if_busy()
    assert capsys.readouterr().err == ""
