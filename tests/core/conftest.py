"""Tiny bundles built without torch (random weights), one directory per parameter set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modrt import routing, synthetic, synthetic_lm


def _mlp_reference(w: synthetic.Weights, x: np.ndarray, a: np.ndarray, rule: str) -> np.ndarray:
    """The layer's output computed row by row in plain numpy: the package's one reference."""
    return routing.mlp_reference(w.w1, w.b1, w.w2, w.b2, x, a, rule)


def _forced_weights(modules: int, k: int, dims: tuple[int, int, int], picks: list[int]) -> synthetic.Weights:
    """Random module weights and a controller that ignores x: slot j always picks picks[j]."""
    w = synthetic.random_weights(modules, k, dims, seed=3)
    bc = np.full((k, modules), -20.0, np.float32)
    bc[np.arange(k), picks] = 20.0
    return synthetic.Weights(wc=np.zeros_like(w.wc), bc=bc.reshape(-1), w1=w.w1, b1=w.b1, w2=w.w2, b2=w.b2)


@pytest.fixture(scope="session")
def mlp_reference():
    """reference(weights, x, a (B, K), rule) -> (B, D_out), a loop over rows in numpy."""
    return _mlp_reference


@pytest.fixture(scope="session")
def forced_weights():
    """forced(modules, k, dims, picks) -> Weights whose controller always picks ``picks``."""
    return _forced_weights


@pytest.fixture(scope="session")
def ff_bundle(tmp_path_factory):
    """factory(modules, k, dims, combine, seed, weights=None) -> bundle dir (cached)."""
    cache: dict[tuple, Path] = {}

    def make(modules: int = 6, k: int = 1, dims=(8, 16, 8), combine: str = "sum", seed: int = 0,
             weights: synthetic.Weights | None = None, name: str | None = None) -> Path:
        key = (modules, k, tuple(dims), combine, seed, name)
        if weights is not None and name is None:
            raise ValueError("forced weights need a name to cache under")
        if key not in cache:
            d = tmp_path_factory.mktemp(name or f"ff-m{modules}-k{k}-{combine}")
            cache[key] = synthetic.build(d, modules=modules, k=k, dims=tuple(dims), seed=seed,
                                         combine=combine, weights=weights)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def lm_bundle(tmp_path_factory):
    """factory(modules, k, combine, selection) -> a random recurrent LM bundle dir (cached);
    selection "topk" (noisy top-k's inference form) goes with combine "gate"."""
    cache: dict[tuple, Path] = {}

    def make(modules: int = 5, k: int = 1, combine: str = "sum", selection: str = "slots") -> Path:
        key = (modules, k, combine, selection)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"lm-m{modules}-k{k}-{combine}-{selection}")
            cache[key] = synthetic_lm.build(d, vocab=40, modules=modules, k=k, embedding=8,
                                            hidden=12, combine=combine, selection=selection, seed=1)
        return cache[key]

    return make


def _check_equal(model, x, rule: str) -> dict:
    """Routed == dense row for row (selection and outputs), and == the numpy reference."""
    r, d = model.run(x=x), model.run_dense(x=x)
    assert r["y"].shape == (x.shape[0], model.output.shape[-1]) and r["y"].dtype == np.float32
    assert r["modules"].dtype == np.int32 and r["modules"].shape == (x.shape[0], 1, model.K)
    np.testing.assert_array_equal(r["modules"], d["modules"])
    np.testing.assert_allclose(r["y"], d["y"], rtol=1e-5, atol=1e-5)
    w = synthetic.read_weights(model.directory, model.manifest)
    ref = _mlp_reference(w, x.astype(np.float64), r["modules"][:, 0], rule)
    np.testing.assert_allclose(r["y"], ref, rtol=1e-4, atol=1e-4)
    return r


@pytest.fixture
def check_equal():
    """``check_equal(model, x, rule) -> routed outputs``, asserting routed == dense == numpy."""
    return _check_equal

