"""Shared fixtures: where the Penn Treebank lies, and factories for tiny configs and corpora.

Torch-free on purpose: ``tests/core`` must run without PyTorch. Torch-only setup lives in
``tests/train/conftest.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from modrt.data.ptb import Corpus

REPO = Path(__file__).resolve().parents[1]
# CI clones the repository with shared/ beside it, as in the development checkout.
PTB_DIR = REPO.parent / "shared" / "data" / "ptb"


@pytest.fixture(scope="session", autouse=True)
def _strategy_cache(tmp_path_factory):
    """``modrt.load``'s auto strategy caches its choice under $MODRT_CACHE: keep every test
    (and the subprocesses they start) out of the user's cache directory."""
    old = os.environ.get("MODRT_CACHE")
    os.environ["MODRT_CACHE"] = str(tmp_path_factory.mktemp("modrt-cache"))
    yield
    if old is None:
        os.environ.pop("MODRT_CACHE", None)
    else:
        os.environ["MODRT_CACHE"] = old


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def ptb_dir() -> Path:
    """The real PTB directory (../shared/data/ptb beside the checkout); read-only."""
    if not (PTB_DIR / "ptb.train.txt").is_file():
        pytest.skip(f"Penn Treebank not found at {PTB_DIR}")
    return PTB_DIR


@pytest.fixture
def tiny_model_config():
    """ModelConfig factory: embedding 8, hidden 16, M=3, K=1 unless overridden."""
    from modrt.train.config import ModelConfig

    def make(**overrides) -> ModelConfig:
        base = dict(vocab_size=10, embedding=8, hidden=16, modules=3, k=1)
        return ModelConfig(**{**base, **overrides})

    return make


@pytest.fixture
def tiny_train_config():
    """TrainConfig factory: T=5, B=4, S=3, cpu, a line per step, no periodic checkpoints."""
    from modrt.train.config import TrainConfig

    def make(**overrides) -> TrainConfig:
        base = dict(samples=3, e_step_every=2, bptt=5, batch_size=4, eval_batch_size=2,
                    epochs=100, steps=10, seed=1, device="cpu", ckpt_every=0, log_every=1)
        return TrainConfig(**{**base, **overrides})

    return make


@pytest.fixture
def tiny_corpus(tmp_path):
    """Corpus factory over a hand-made vocabulary of ``vocab`` words.

    ``repeat=True`` gives the cycle 0, 1, ..., V-1, 0, 1, ... (learnable); otherwise
    uniform random ids from a fixed seed.
    """

    def make(vocab: int = 10, train: int = 148, valid: int = 40, test: int = 40,
             repeat: bool = True, seed: int = 0) -> Corpus:
        rng = np.random.default_rng(seed)

        def tokens(n: int) -> np.ndarray:
            if repeat:
                return (np.arange(n) % vocab).astype(np.int64)
            return rng.integers(0, vocab, size=n, dtype=np.int64)

        return Corpus(vocab=tuple(f"w{i}" for i in range(vocab)), train=tokens(train),
                      valid=tokens(valid), test=tokens(test), directory=tmp_path)

    return make
