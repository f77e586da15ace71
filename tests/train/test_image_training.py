"""CIFAR-10 training through the one trainer and method interface: every method runs,
resumes exactly, keeps its a* memory per training image, and the CLI refuses bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from modrt.data.cifar10 import CIFAR10, CLASSES
from modrt.train import checkpoint
from modrt.train import model as lm
from modrt.train.config import ImageModelConfig, TrainConfig
from modrt.train.conv import ModularConvNet
from modrt.train.methods import Images, em
from modrt.train.tasks import augment
from modrt.train.trainer import Trainer

N_TRAIN, N_TEST = 40, 20


def tiny_cifar(seed: int = 0) -> CIFAR10:
    """Random images whose class shows in their mean colour: learnable in a few steps."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = np.arange(n) % 10
        base = (labels * 25).astype(np.int16)[:, None, None, None]
        images = np.clip(base + rng.integers(-20, 20, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
        return images, labels.astype(np.int64)

    tr, te = split(N_TRAIN), split(N_TEST)
    return CIFAR10(tr[0], tr[1], te[0], te[1], CLASSES, Path("tiny"))


def cfg(method: str = "em", **kw) -> ImageModelConfig:
    base = {"channels": (4, 4), "modules": 3, "k": 1, "method": method}
    if method == "dense":
        base.update(modules=1)
    if method == "noisy-topk":
        base.update(k=2, combine="gate")
    return ImageModelConfig(**{**base, **kw})


def tcfg(**kw) -> TrainConfig:
    return TrainConfig(**{"device": "cpu", "batch_size": 16, "samples": 4, "log_every": 2, "ckpt_every": 0,
                          "epochs": 2, **kw})


def _train_losses(run: Path) -> list[float]:
    import json

    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train"]


EM_EXTRA = {"em-warm-balance": {"warm_start": 2, "balance_rate": 0.3, "prior_weight": 1.0, "augment": True},
            "em-warm-capacity": {"warm_start": 2, "capacity": 1.2, "prior_weight": 1.0},
            "em-controller-start": {"warm_start": 2, "capacity": 1.2, "prior_weight": 1.0,
                                    "a_star_init": "controller"}}


@pytest.mark.parametrize("method", ["em", "dense", "reinforce", "noisy-topk", "em-warm-balance", "em-warm-capacity",
                                    "em-controller-start"])
def test_every_method_resumes_exactly(method, tmp_path):
    extra = EM_EXTRA.get(method, {})
    mcfg = cfg("em" if method.startswith("em") else method)
    data = tiny_cifar()
    N = 5  # 3 batches an epoch (16, 16, 8): crosses an epoch boundary
    whole = Trainer(mcfg, tcfg(steps=N, **extra), data, tmp_path / "whole", progress=False)
    assert whole.windows == 3
    res = whole.fit()
    first = Trainer(mcfg, tcfg(steps=2, **extra), data, tmp_path / "half", progress=False)
    first.fit()
    ckpt = checkpoint.load(tmp_path / "half" / "ckpt.pt")
    assert ckpt["classes"] == list(CLASSES) and ckpt["hidden"] is None
    second = Trainer(mcfg, tcfg(steps=N, **extra), data, tmp_path / "resumed", resume=ckpt, progress=False)
    second.fit()
    assert first.losses + second.losses == whole.losses  # exact
    assert _train_losses(tmp_path / "resumed") == _train_losses(tmp_path / "whole")
    for name, p in whole.model.state_dict().items():
        assert torch.equal(p, second.model.state_dict()[name]), name
    a, b = whole.method.state(), second.method.state()
    for key in a:
        assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key
    if mcfg.method == "em":
        assert a["memory"].shape == (N_TRAIN, 2, 1)  # one selection per training image and layer
        if extra:
            assert a["bias"].shape == (2, 3) and a["upcycled"]  # a bias row per layer
    assert 0.0 <= res["train_acc"] <= 1.0 and 0.0 <= res["test_acc"] <= 1.0
    assert len(res["test_module_usage"]) == 2  # per layer
    recs = [r for r in whole.metrics if r["kind"] == "valid"]
    assert [r["epoch"] for r in recs] == [1] and {"test_acc", "train_acc_subset"} <= recs[0].keys()
    assert "acc" in [r for r in whole.metrics if r["kind"] == "train"][0]


def test_training_raises_training_accuracy(tmp_path):
    """A real signal is learned: the colour-coded classes are fitted within a few epochs."""
    t = Trainer(cfg("dense", channels=(8, 8)), tcfg(epochs=16, lr=1e-2), tiny_cifar(), tmp_path / "run",
                progress=False)
    res = t.fit()
    assert res["train_acc"] >= 0.4, res  # chance: 0.1 (seeded: 0.5 measured)


def _batch(model, data, B=8):
    x = (torch.from_numpy(data.train_images[:B]).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    y = torch.from_numpy(data.train_labels[:B])
    return Images(x, y, torch.arange(B), model.cfg.layers, 0, 0, 0)


def test_image_e_step_never_lowers_an_images_score_and_keeps_a_star_on_ties():
    torch.manual_seed(0)
    model = ModularConvNet(cfg()).eval()
    w = _batch(model, tiny_cifar())
    a_star = torch.randint(0, 3, (2, 8, 1))

    def score(a):
        out = model(w.x, lm.given(a))
        return model.log_likelihood(out.logits, w.y) + out.log_pa.sum(0)

    e = em.e_step_of(model, w, a_star, samples=6, generator=torch.Generator().manual_seed(1), prior_weight=1.0)
    assert e.best.shape == (2, 8, 1)
    assert (score(e.best) >= score(a_star) - 1e-5).all()
    torch.testing.assert_close(e.scores[0], score(a_star), rtol=1e-5, atol=1e-5)
    # One candidate: only a* itself, which is kept.
    same = em.e_step_of(model, w, a_star, samples=1, prior_weight=1.0)
    assert torch.equal(same.best, a_star) and not same.changed.any()


@pytest.mark.parametrize("capacity", [0.0, 1.2])
def test_capacity_keeps_every_layers_modules_within_the_cap(tmp_path, capacity):
    # The paper's joint score from a uniform start drives a* towards whatever the controller
    # prefers; the cap keeps each layer's modules at most 1.2 x an even share of the 40
    # images (16), and the kept counts follow the memory.
    torch.manual_seed(0)
    t = Trainer(cfg(modules=3), tcfg(epochs=6, prior_weight=1.0, capacity=capacity, lr=1e-2), tiny_cifar(),
                tmp_path / "run", progress=False)
    t.fit()
    memory = t.method.state()["memory"]
    counts = em.group_counts(memory, 2, 3)  # (layers, M)
    assert any(r["e_step_improved"] for r in t.metrics if r["kind"] == "train")  # the E-step moved images
    if capacity:
        assert counts.max() <= 1.2 * N_TRAIN / 3, counts
        assert torch.equal(t.method.load, counts)
    else:  # the test's premise: without the cap some module goes above it
        assert counts.max() > 1.2 * N_TRAIN / 3, counts


def test_controller_start_takes_the_most_probable_module_with_room():
    # One layer of 3 modules; a memory of exactly these 4 examples (load 2 / 1 / 1), all
    # surest of module 0. Cap 1.5 x an even share (4 / 3) = 2: the two surest (3, then 0)
    # get module 0; example 1 its next choice with room (2), example 2 its (1).
    lp = torch.log_softmax(torch.tensor([[5.0, 1.0, 0.0], [4.0, 0.0, 1.0], [3.0, 2.0, 0.0], [6.0, 0.0, 0.0]]), -1)
    lp = lp.view(1, 4, 1, 3)  # (P, B, K, M)
    old = torch.tensor([0, 1, 2, 0]).view(1, 4, 1)
    load = torch.tensor([[2.0, 1.0, 1.0]], dtype=torch.double)
    start = em.controller_start(lp, old, load, 1.5)
    assert start.flatten().tolist() == [0, 2, 1, 0]
    assert torch.equal(em.group_counts(start.permute(1, 0, 2), 1, 3), load)  # the load follows
    # Without a cap: the controller's argmax for every example.
    assert em.controller_start(lp, old, None, 1.0).flatten().tolist() == [0, 0, 0, 0]


def test_controller_start_sets_each_images_a_star_once_to_the_controllers_choice(tmp_path):
    torch.manual_seed(0)
    t = Trainer(cfg(modules=3), tcfg(steps=3, a_star_init="controller", samples=1), tiny_cifar(), tmp_path / "run",
                progress=False)
    t.fit()  # S=1: the E-step never moves a*, so the memory holds the start
    state = t.method.state()
    seen = torch.zeros(N_TRAIN, dtype=torch.bool)
    for step in range(3):
        seen[t.task.batch(step % 3, 0, step, None).ids] = True
    assert torch.equal(state["fresh"], ~seen)  # 3 batches of an epoch: every image once
    with pytest.raises(ValueError, match="word E-step keeps a table"):
        TrainConfig(e_step="word", a_star_init="controller")


def test_position_e_step_is_refused_for_images():
    model = ModularConvNet(cfg())
    from modrt.train.methods import build

    with pytest.raises(ValueError, match="no meaning for images"):
        build(model, model.cfg, TrainConfig(e_step="position"), N_TRAIN, 2)


def test_augment_crops_and_flips_deterministically():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    a = augment(x, torch.Generator().manual_seed(5))
    b = augment(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape
    # Every output row is a (possibly flipped) shifted window of the zero-padded input.
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(2):
        hits = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)
                if torch.equal(a[i], (lambda p: p.flip(-1) if f else p)(padded[i, :, dy:dy + 8, dx:dx + 8]))]
        assert hits, i


def test_cli_trains_resumes_and_refuses_bad_input(tmp_path, monkeypatch):
    from modrt.cli import cli

    data = tiny_cifar()
    monkeypatch.setattr("modrt.data.cifar10.load", lambda *a, **k: data)
    run = tmp_path / "run"
    args = ["train", "cifar10", "--size", "demo", "--channels", "4,4", "--samples", "3", "--batch-size", "16",
            "--steps", "2", "--quiet", "--out", str(run)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "train acc" in res.output and (run / "ckpt.pt").is_file()
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "already holds a run" in again.output
    res = CliRunner().invoke(cli, ["train", "cifar10", "--resume", str(run / "ckpt.pt"), "--steps", "3", "-q",
                                   "--channels", "4,4", "--size", "demo"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["train", "cifar10", "--resume", str(run / "ckpt.pt"), "--channels", "8,8"])
    assert res.exit_code == 1 and "it was trained with (4, 4)" in res.output
    res = CliRunner().invoke(cli, ["train", "cifar10", "--resume", str(run / "ckpt.pt"), "--controller-pool", "2"])
    assert res.exit_code == 1 and "controller" in res.output and "it was trained with 1" in res.output, res.output
    ptb = CliRunner().invoke(cli, ["train", "ptb", "--resume", str(run / "ckpt.pt")])
    assert ptb.exit_code == 1 and "a cifar10 checkpoint" in ptb.output
    for bad, msg in [(["--channels", "8,x"], "comma-separated filter counts"),
                     (["--channels", "8,8,8,8,8,8"], "halve a 32-pixel image"),
                     (["--method", "hash"], "'hash' is not one of"),
                     (["--method", "dense", "--samples", "4"], "--samples is an EM option"),
                     (["--method", "noisy-topk", "--combine", "mean"], "does not apply to noisy-topk"),
                     (["--controller-pool", "3"], "must divide every modular layer's input side")]:
        res = CliRunner().invoke(cli, ["train", "cifar10", *bad, "--out", str(tmp_path / "x")])
        assert res.exit_code == 2 and msg in res.output, (bad, res.output)
