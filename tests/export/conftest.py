"""Tiny checkpoints exported once per session (real PTB vocabulary, random weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modrt.data import ptb
from modrt.train.config import ModelConfig, TrainConfig
from modrt.train.trainer import Trainer

PTB = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ptb"


@pytest.fixture(scope="session")
def ptb_dir() -> Path:
    return PTB


@pytest.fixture(scope="session")
def corpus() -> ptb.Corpus:
    return ptb.load(PTB)


def make_ckpt(corpus: ptb.Corpus, out: Path, **model) -> Path:
    cfg = ModelConfig(**{"embedding": 8, "hidden": 16, **model})
    torch.manual_seed(0)
    tr = Trainer(cfg, TrainConfig(device="cpu", batch_size=4, bptt=5), corpus, out, progress=False)
    if cfg.selection == "topk":  # noisy top-k's gate starts at zero: give it distinct logits
        with torch.no_grad():
            torch.nn.init.normal_(tr.model.layer.controller.weight, std=0.5)
    out.mkdir(parents=True, exist_ok=True)
    return tr.save()


@pytest.fixture(scope="session")
def bundles(tmp_path_factory, corpus) -> dict[str, tuple[Path, Path]]:
    """name -> (ckpt, bundle dir) for EM K=1, K=3 (mean), a dense (2, 2) model, REINFORCE
    (5, 2) and noisy top-k (6, k=2, gate)."""
    from modrt.export.exporter import export

    out = {}
    for name, cfg in {"k1": dict(modules=5, k=1), "k3": dict(modules=6, k=3, combine="mean"),
                      "dense": dict(modules=2, k=2, method="dense"),
                      "reinforce": dict(modules=5, k=2, method="reinforce"),
                      "noisy": dict(modules=6, k=2, method="noisy-topk", combine="gate")}.items():
        d = tmp_path_factory.mktemp(name)
        ckpt = make_ckpt(corpus, d / "run", **cfg)
        export(ckpt, d / "bundle", progress=False, data=PTB, parity_tokens=400)
        out[name] = (ckpt, d / "bundle")
    return out
