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


# --- Triton's Python backend, in this process --------------------------------------------


class _TritonBackend:
    """A stand-in for ``triton_python_backend_utils`` (the names modrt's routing model uses):
    BLS calls run the repository's own ``model.onnx`` files with ONNX Runtime and are
    counted per model in rows, as Triton's ``nv_inference_count`` counts them. Lets CI run
    the router's routing without a Triton server; ``tests/core/test_triton.py``'s slow test
    runs the same router in a real one."""

    def __init__(self, models: Path):
        import types
        from collections import Counter

        import onnxruntime as ort

        self.calls: Counter[str] = Counter()
        self.metrics: dict[tuple, int] = {}
        sessions = {p.name: ort.InferenceSession(str(p / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
                    for p in models.iterdir() if (p / "1" / "model.onnx").is_file()}
        backend = self

        class Tensor:
            def __init__(self, name, array):
                self._name, self._a = name, np.asarray(array)

            def name(self):
                return self._name

            def as_numpy(self):
                return self._a

        class TritonError:
            def __init__(self, msg):
                self._m = msg

            def message(self):
                return self._m

        class InferenceResponse:
            def __init__(self, output_tensors, error=None):
                self.outputs, self._error = {t.name(): t for t in output_tensors}, error

            def has_error(self):
                return self._error is not None

            def error(self):
                return self._error

        class InferenceRequest:
            def __init__(self, model_name, requested_output_names, inputs):
                self.model, self.names, self.inputs = model_name, requested_output_names, inputs

            async def async_exec(self):
                feeds = {t.name(): t.as_numpy() for t in self.inputs}
                backend.calls[self.model] += next(iter(feeds.values())).shape[0]
                out = sessions[self.model].run(self.names, feeds)
                return InferenceResponse([Tensor(n, v) for n, v in zip(self.names, out, strict=True)])

        class Metric:
            def __init__(self, labels):
                self.key = (labels["layer"], int(labels["module"]))
                backend.metrics[self.key] = 0

            def increment(self, v):
                backend.metrics[self.key] += int(v)

        class MetricFamily:
            COUNTER = "counter"

            def __init__(self, name, description, kind):
                self.name = name

            def Metric(self, labels):  # noqa: N802 - Triton's name
                return Metric(labels)

        mod = types.ModuleType("triton_python_backend_utils")
        mod.Tensor, mod.TritonError, mod.InferenceResponse, mod.InferenceRequest = (
            Tensor, TritonError, InferenceResponse, InferenceRequest)
        mod.MetricFamily, mod.TritonModelException = MetricFamily, type("TritonModelException", (Exception,), {})
        mod.get_input_tensor_by_name = lambda r, n: r.inputs.get(n)
        mod.get_output_tensor_by_name = lambda r, n: r.outputs.get(n)
        self.module = mod


class _Router:
    """A repository's routing model loaded in-process: ``infer(*feeds) -> responses``."""

    def __init__(self, models: Path, name: str, monkeypatch):
        import importlib.util
        import sys

        self.backend = b = _TritonBackend(models)
        here = models / name / "1"
        monkeypatch.setitem(sys.modules, "triton_python_backend_utils", b.module)
        monkeypatch.syspath_prepend(str(here))
        monkeypatch.delitem(sys.modules, "modrt_routing", raising=False)
        spec = importlib.util.spec_from_file_location(f"router_{name}_{id(b)}", here / "model.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        self.model = mod.TritonPythonModel()
        self.model.initialize({"model_repository": str(models / name), "model_version": "1", "model_name": name,
                               "model_config": (models / name / "config.pbtxt").read_text()})
        self.calls, self.metrics = b.calls, b.metrics

    def infer(self, *requests: dict[str, np.ndarray]) -> list:
        import asyncio
        import types

        reqs = [types.SimpleNamespace(inputs={n: self.backend.module.Tensor(n, v) for n, v in r.items()})
                for r in requests]
        return asyncio.run(self.model.execute(reqs))

    @staticmethod
    def outputs(resp) -> dict[str, np.ndarray]:
        assert not resp.has_error(), resp.error().message()
        return {n: t.as_numpy() for n, t in resp.outputs.items()}


@pytest.fixture
def triton_router(monkeypatch):
    """``triton_router(repo, name)``: the routing model ``modrt export-triton`` wrote into
    ``repo``, run in this process over a stand-in for Triton's Python backend."""
    from modrt.triton.repository import models_dir

    return lambda repo, name: _Router(models_dir(repo), name, monkeypatch)
