"""``modrt inspect``: plots and a summary from a tiny checkpoint over the real PTB vocabulary."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from modrt.cli import cli

PTB_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ptb"  # beside the checkout


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from modrt.data import ptb
    from modrt.train.config import ModelConfig, TrainConfig
    from modrt.train.trainer import Trainer

    if not (PTB_DIR / "ptb.train.txt").is_file():
        pytest.skip(f"Penn Treebank not found at {PTB_DIR}")
    corpus = ptb.load(PTB_DIR)
    out = tmp_path_factory.mktemp("run")
    tr = Trainer(ModelConfig(embedding=8, hidden=16, modules=4, k=2), TrainConfig(
        device="cpu", batch_size=4, bptt=5, steps=6, log_every=2, eval_batch_size=50), corpus, out, progress=False)
    tr.task.train_data = tr.task.train_data[:60]  # a few windows: quick
    tr.task.batches = 3
    tr.fit()
    return out / "ckpt.pt"


def test_inspect_writes_plots_and_summary(ckpt, ptb_dir, tmp_path):
    res = CliRunner().invoke(cli, ["inspect", str(ckpt), "--out", str(tmp_path / "ins"), "--tokens", "3000",
                                   "--data", str(ptb_dir), "--words", "12", "--min-count", "5"])
    assert res.exit_code == 0, res.output
    for png in ("training.png", "modules_words.png"):
        w, h = _png_size(tmp_path / "ins" / png)
        assert w > 300 and h > 200
    report = json.loads((tmp_path / "ins" / "inspect.json").read_text())
    assert report["modules"] == 4 and report["tokens"] == 3000 and len(report["heatmap_words"]) == 12
    from modrt.data import ptb

    corpus = ptb.load(ptb_dir)
    counts = np.bincount(corpus.valid[:3000], minlength=len(corpus.vocab))
    assert report["heatmap_words"][0] == corpus.vocab[int(counts.argmax())]  # most frequent first
    assert abs(sum(report["module_share"]) - 1) < 1e-3
    assert 1 <= report["usage_exp_entropy"] <= 4
    assert 1 <= report["controller_exp_entropy_example"] <= report["controller_exp_entropy_batch"] + 1e-6 <= 4 + 1e-6
    summary = (tmp_path / "ins" / "summary.txt").read_text()
    assert all(f"m{m} " in summary for m in range(4)) and "modules in use" in summary
    assert summary in res.output


def test_inspect_bad_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"not a checkpoint")
    res = CliRunner().invoke(cli, ["inspect", str(bad)])
    assert res.exit_code == 1
    assert "not a modrt checkpoint" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["inspect", str(tmp_path / "missing.pt")])
    assert res.exit_code == 1 and "no such checkpoint" in res.output


def test_class_counts_counts_a_module_drawn_twice_once():
    from modrt.train.introspect import class_counts

    a = np.array([[[0, 0], [1, 2]], [[2, 1], [1, 1]]])  # (N=2, L=2, K=2)
    c = class_counts(a, np.array([0, 1]), modules=3, classes=2)
    assert c.shape == (2, 3, 2)
    assert c[0].tolist() == [[1, 0], [0, 1], [0, 1]]  # layer 0: image 0 -> {0}, image 1 -> {1, 2}
    assert c[1].tolist() == [[0, 0], [1, 1], [1, 0]]  # layer 1: image 0 -> {1, 2}, image 1 -> {1}


def test_inspect_an_image_checkpoint(tmp_path, monkeypatch):
    """CIFAR-10: training curve in accuracy, P(module | class) per layer, the example grid,
    and per-layer shares that add up."""
    from modrt.data import cifar10
    from modrt.train.config import ImageModelConfig, TrainConfig
    from modrt.train.trainer import Trainer

    rng = np.random.default_rng(0)

    def split(n):
        labels = (np.arange(n) % 10).astype(np.int64)
        return rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8), labels

    (tr, trl), (te, tel) = split(40), split(30)
    data = cifar10.CIFAR10(tr, trl, te, tel, cifar10.CLASSES, Path("tiny"))
    monkeypatch.setattr(cifar10, "load", lambda *a, **k: data)
    run = tmp_path / "run"
    Trainer(ImageModelConfig(channels=(4, 6, 4), method="noisy-topk", modules=3, k=2, combine="gate"),
            TrainConfig(device="cpu", batch_size=16, steps=4, log_every=2), data, run, progress=False).fit()
    res = CliRunner().invoke(cli, ["inspect", str(run / "ckpt.pt"), "--out", str(tmp_path / "ins"), "--layer", "1"])
    assert res.exit_code == 0, res.output
    for png in ("training.png", "modules_classes.png", "modules_examples.png"):
        w, h = _png_size(tmp_path / "ins" / png)
        assert w > 300 and h > 150
    report = json.loads((tmp_path / "ins" / "inspect.json").read_text())
    assert report["images"] == 30 and report["layers"] == 3 and report["split"] == "test"
    assert len(report["module_share"]) == 3 and all(abs(sum(s) - 1) < 1e-3 for s in report["module_share"])
    assert all(1 <= e <= 3 + 1e-6 for e in report["usage_exp_entropy"])
    assert "layer 2: modules in use" in res.output
    bad = CliRunner().invoke(cli, ["inspect", str(run / "ckpt.pt"), "--out", str(tmp_path / "i2"), "--layer", "7"])
    assert bad.exit_code == 1 and "layers 0..2" in bad.output
