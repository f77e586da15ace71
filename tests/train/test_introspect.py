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
