"""modrt.train.trainer.Trainer on tiny hand-made corpora: it learns, and it resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modrt.train import checkpoint
from modrt.train.trainer import Trainer

CKPT_KEYS = {"format", "version", "model_config", "train_config", "vocab", "model", "optimizer",
             "method", "step", "epoch", "rng", "metrics"}


def _train_losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def test_loss_falls_on_a_repetitive_corpus(tmp_path, tiny_corpus, tiny_model_config,
                                           tiny_train_config):
    corpus = tiny_corpus(vocab=10, train=2000)
    mcfg = tiny_model_config(vocab_size=10, dropout=0.0)
    tcfg = tiny_train_config(steps=30, lr=3e-2)
    trainer = Trainer(mcfg, tcfg, corpus, tmp_path / "run", progress=False)
    summary = trainer.fit()
    losses = _train_losses(tmp_path / "run")
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert summary["kind"] == "test" and summary["step"] == 30
    assert summary["valid_ppl"] < 5  # uniform over the 10 words: 10
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    e_steps = [r["e_step_improved"] for r in records if r["kind"] == "train"]
    assert all(v is not None for v in e_steps[::2]) and all(v is None for v in e_steps[1::2])


def test_dense_baseline_trains(tmp_path, tiny_corpus, tiny_model_config, tiny_train_config):
    mcfg = tiny_model_config(modules=2, k=2, method="dense")
    trainer = Trainer(mcfg, tiny_train_config(steps=3), tiny_corpus(), tmp_path / "run",
                      progress=False)
    assert trainer.method.state() == {}
    summary = trainer.fit()
    assert summary["step"] == 3 and summary["modules_in_use"] == 2


# Every method, and EM with every E-step variant on at once (warm start ends at step 3,
# before the stop at 7; the prior anneals over the steps after it).
EM_VARIANTS = {"e_step": "position", "samples": 3, "balance_rate": 0.05, "warm_start": 3, "prior_anneal": 6,
               "prior_weight": 1.0, "a_star_init": "hash"}
# The word E-step: a word table, its gain statistics and the capacity's loads carry over.
EM_WORD = {"e_step": "word", "samples": 3, "capacity": 1.5, "warm_start": 3, "a_star_init": "hash"}


@pytest.mark.parametrize("method", ["em", "em-variants", "em-word", "reinforce", "noisy-topk", "hash", "dense"])
def test_stop_and_resume_is_exact(tmp_path, tiny_corpus, tiny_model_config, tiny_train_config, method):
    # 37 rows of 4 streams, T=5: 8 windows per epoch, the last one a single step; 14 steps
    # cross an epoch end (validation, hidden state reset) on either side of the stop.
    corpus = tiny_corpus(vocab=10, train=148, repeat=False)
    extra = {"noisy-topk": {"k": 2, "combine": "gate"}, "dense": {"modules": 1}}.get(method, {})
    train_extra = {"em-variants": EM_VARIANTS, "em-word": EM_WORD}.get(method, {})
    method = "em" if method.startswith("em") else method
    # dropout: the RNG state must carry over (and REINFORCE's draws, noisy top-k's noise)
    mcfg = tiny_model_config(vocab_size=10, dropout=0.3, method=method, **extra)
    N = 14
    _config = tiny_train_config

    def tiny_train_config(**kw):
        return _config(**train_extra, **kw)

    whole = Trainer(mcfg, tiny_train_config(steps=N), corpus, tmp_path / "whole", progress=False)
    assert whole.windows == 8
    whole.fit()

    first = Trainer(mcfg, tiny_train_config(steps=N // 2), corpus, tmp_path / "half",
                    progress=False)
    first.fit()
    ckpt_path = tmp_path / "half" / "ckpt.pt"
    ckpt = checkpoint.load(ckpt_path)
    assert ckpt["step"] == N // 2
    second = Trainer(mcfg, tiny_train_config(steps=N), corpus, tmp_path / "resumed",
                     resume=ckpt, progress=False)
    second.fit()

    assert first.losses + second.losses == whole.losses  # exact, not approximately
    assert _train_losses(tmp_path / "resumed") == _train_losses(tmp_path / "whole")
    assert len(_train_losses(tmp_path / "whole")) == N
    assert second.step == whole.step == N and second.epoch == whole.epoch == 1
    for name, p in whole.model.state_dict().items():
        assert torch.equal(p, second.model.state_dict()[name]), name
    a, b = whole.method.state(), second.method.state()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key
    if method == "em" and train_extra.get("e_step") == "word":
        assert a["memory"] is None and a["table"].shape == (10, 1) and a["seen"].sum() > 0
    elif method == "em":
        assert a["memory"].shape == (whole.windows * 4, 5, 1)
    if method == "reinforce":
        assert a["baseline"] is not None
    # Wall time adds up over both sessions of the resumed run.
    final = checkpoint.load(tmp_path / "resumed" / "ckpt.pt")
    assert ckpt["seconds"] > 0 and final["seconds"] > ckpt["seconds"]
    test_line = [json.loads(l) for l in open(tmp_path / "resumed" / "metrics.jsonl")][-1]
    assert test_line["kind"] == "test" and test_line["seconds"] >= round(ckpt["seconds"], 3)


def test_checkpoint_is_weights_only(tmp_path, tiny_corpus, tiny_model_config, tiny_train_config):
    corpus = tiny_corpus()
    trainer = Trainer(tiny_model_config(), tiny_train_config(steps=2), corpus, tmp_path,
                      progress=False)
    trainer.fit()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert CKPT_KEYS <= set(ckpt)
    assert ckpt["format"] == checkpoint.FORMAT and ckpt["version"] == checkpoint.VERSION
    assert ckpt["model_config"]["hidden"] == 16 and ckpt["train_config"]["bptt"] == 5
    assert ckpt["vocab"] == list(corpus.vocab)
    assert ckpt["step"] == 2
    assert ckpt["method"]["memory"].shape == (trainer.windows * 4, 5, 1)
    assert set(ckpt["model"]) == set(trainer.model.state_dict())
    assert [m["kind"] for m in ckpt["metrics"]] == ["train", "train", "test"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.pt.tmp")]  # atomic write


def test_checkpoint_load_refuses_any_garbage(tmp_path):
    """Random bytes make torch's unpickler raise all kinds of errors; each must become one CheckpointError."""
    import numpy as np

    from modrt._exceptions import CheckpointError

    rng = np.random.default_rng(0)
    bad = tmp_path / "ckpt.pt"
    for size in [0, 1, 2, 8, 64, 4096] * 40:
        bad.write_bytes(rng.bytes(size))
        try:
            checkpoint.load(bad)
        except CheckpointError as exc:
            assert "not a modrt checkpoint" in str(exc)
        else:
            raise AssertionError(f"{size} random bytes loaded as a checkpoint")


def test_divergence_stops_with_one_clear_error_and_keeps_the_last_checkpoint(
        tmp_path, tiny_corpus, tiny_model_config, tiny_train_config):
    """Non-finite numbers stop training with a TrainingError naming the step, the checkpoint
    kept and what to try; nothing is saved over the last good checkpoint. Two ways in: a NaN
    loss (M-step) and NaN controller probabilities (the E-step's draws)."""
    from modrt import TrainingError

    corpus = tiny_corpus()
    mcfg = tiny_model_config(modules=3, k=2, combine="sum")
    first = Trainer(mcfg, tiny_train_config(steps=2), corpus, tmp_path / "run", progress=False)
    first.fit()
    good = (tmp_path / "run" / "ckpt.pt").read_bytes()
    for poison, cause in (("cells", "probability tensor contains"), ("controller", "probability tensor contains")):
        t = Trainer(mcfg, tiny_train_config(steps=6), corpus, tmp_path / "run",
                    resume=checkpoint.load(tmp_path / "run" / "ckpt.pt"), progress=False)
        with torch.no_grad():
            for p in getattr(t.model.layer, poison).parameters():
                p.fill_(float("nan"))
        with pytest.raises(TrainingError) as err:
            t.fit()
        msg = str(err.value)
        assert "training diverged at step 3" in msg and cause in msg and str(tmp_path / "run" / "ckpt.pt") in msg
        assert "--combine mean" in msg and "2-fold" in msg
        assert (tmp_path / "run" / "ckpt.pt").read_bytes() == good
    dense = tiny_model_config(modules=2, k=2, method="dense")  # no draws: the NaN loss path
    fresh = Trainer(dense, tiny_train_config(steps=2), corpus, tmp_path / "fresh", progress=False)
    with torch.no_grad():
        for p in fresh.model.parameters():
            p.fill_(float("nan"))
    nan_loss = r"at step 1 \(the training loss is nan\); no checkpoint was saved\. Try a lower --lr"
    with pytest.raises(TrainingError, match=nan_loss):
        fresh.fit()
