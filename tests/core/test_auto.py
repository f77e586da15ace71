"""``auto``: measured once per bundle, machine and provider, cached, re-measured when the
bundle changes; ``--strategy`` on the command lines."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import modrt
from modrt import bench, synthetic
from modrt.cli import cli
from modrt.runtime import auto

DIMS = (8, 16, 8)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv(auto.CACHE_ENV, str(d))
    return d / "strategy"


@pytest.fixture
def measured(monkeypatch):
    """Counts the measurements ``auto`` makes (each is one layer at one batch size)."""
    calls = []
    real = auto.measure

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(auto, "measure", counting)
    return calls


def _equal_to_dense(model):
    x = np.random.default_rng(1).standard_normal((5, DIMS[0])).astype(np.float32)
    r, d = model.run(x=x), model.run_dense(x=x)
    np.testing.assert_array_equal(r["modules"], d["modules"])
    np.testing.assert_allclose(r["y"], d["y"], rtol=1e-5, atol=1e-5)


def test_choice_is_cached_and_invalidated_when_the_bundle_changes(tmp_path, cache, measured):
    d = synthetic.build(tmp_path / "b", modules=6, k=2, dims=DIMS, seed=0)
    first = modrt.load(d)
    assert len(measured) == len(auto.AutoConfig().batches)
    files = list(cache.glob("*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["provider"] == "CPUExecutionProvider" and record["machine"]["cores"] >= 1
    # (and graph@N, fused@N where this process may use N > 1 cores: see the test below)
    assert set(record["measured"]["layer0"]["us_per_call"]["1"]) >= {"host", "graph", "fused"}
    assert record["layers"]["layer0"][-1]["max_batch"] is None

    again = modrt.load(d)  # same bundle, machine, provider: read from the cache, nothing measured
    assert len(measured) == 3
    assert again.choice == first.choice
    _equal_to_dense(again)

    synthetic.build(d, modules=6, k=2, dims=DIMS, seed=1)  # re-exported in place: new weights
    changed = modrt.load(d)
    assert len(measured) == 6 and len(list(cache.glob("*.json"))) == 2
    _equal_to_dense(changed)


def test_a_corrupt_cache_entry_is_measured_again(tmp_path, cache, measured):
    d = synthetic.build(tmp_path / "b", modules=4, k=1, dims=DIMS)
    modrt.load(d)
    (path,) = cache.glob("*.json")
    path.write_text("{not json")
    _equal_to_dense(modrt.load(d))
    assert len(measured) == 6 and json.loads(path.read_text())["layers"]


def test_cache_off_and_unwritable_cache_dir(tmp_path, monkeypatch, measured):
    d = synthetic.build(tmp_path / "b", modules=4, k=1, dims=DIMS)
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(auto.CACHE_ENV, str(blocker))  # a file where the directory should be
    _equal_to_dense(modrt.load(d))  # a warning, not a failure
    modrt.load(d, auto_config=auto.AutoConfig(cache=False))
    assert len(measured) == 6


def test_large_modules_keep_host_without_measuring(tmp_path, cache, measured):
    d = synthetic.build(tmp_path / "b", modules=4, k=1, dims=DIMS)
    model = modrt.load(d, auto_config=auto.AutoConfig(large_layer_bytes=0))
    assert measured == [] and model.choice == {"layer0": "host for batch 1+"}
    assert model.strategy_for(64) == "host"


def test_auto_config_is_validated():
    with pytest.raises(ValueError, match="ascending"):
        auto.AutoConfig(batches=(8, 1))
    with pytest.raises(ValueError, match="seconds > 0"):
        auto.AutoConfig(seconds=0)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(auto.CACHE_ENV, str(tmp_path / "c"))
    assert auto.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(auto.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert auto.cache_dir() == tmp_path / "x" / "modrt"


@pytest.mark.parametrize("strategy", ["host", "graph", "fused", "auto"])
def test_bench_reports_the_strategy_of_every_row(ff_bundle, strategy):
    report = bench.run(ff_bundle(modules=4, k=1, dims=DIMS),
                       bench.BenchConfig(batches=(1, 3), seconds=0.01, warmup=1, torch=False, strategy=strategy),
                       progress=False)
    assert report["config"]["strategy"] == strategy
    for r in report["results"]:
        assert r["strategy"] == strategy if strategy != "auto" else r["strategy"] in ("host", "graph", "fused")
    assert "routed strategy" in bench.format_table(report)
    assert all(d < 1e-4 for d in report["config"]["parity_max_abs_diff"].values())


def test_bench_cli_strategy_and_bad_value():
    res = CliRunner().invoke(cli, ["bench", "--synthetic", "--modules", "4", "--dims", "8,16,8", "--batch", "2",
                                   "--strategy", "graph", "--no-torch", "--seconds", "0.01", "-q"])
    assert res.exit_code == 0, res.output
    assert "strategy=graph" in res.output


@pytest.mark.parametrize("cmd", [["bench", "--synthetic"], ["serve", "nowhere"]])
def test_unknown_strategy_is_one_line_exit_2(cmd):
    p = subprocess.run([sys.executable, "-m", "modrt", *cmd, "--strategy", "warp"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines == ["error: --strategy 'warp' unknown; choose one of auto, host, graph, fused"], p.stderr


def test_explicit_strategy_that_declines_is_one_line(lm_bundle):
    p = subprocess.run([sys.executable, "-m", "modrt", "bench", str(lm_bundle()), "--strategy", "fused",
                        "--seconds", "0.01", "-q"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "strategy 'fused' cannot run layer layer0: recurrent modules" in lines[0]


def test_a_strategy_that_fails_to_build_is_dropped_with_a_warning(ff_bundle, monkeypatch, cache, caplog):
    """A failure that is not a decline (here the composition tool raising) is no InputError:
    named, it is one error naming the cause; under auto the strategy is dropped and the
    reason logged at warning level, and the layer runs on what built."""
    from modrt.runtime import fused, graph

    def boom(*args, **kwargs):
        raise ValueError("unexpected node")

    monkeypatch.setattr(graph, "compose", boom)
    monkeypatch.setattr(fused, "compose", boom)
    d = ff_bundle(modules=4, k=1, dims=DIMS)
    with pytest.raises(modrt.ModrtError, match=r"strategy 'graph' failed to build layer layer0 "
                                               r"\(ValueError: unexpected node\)") as e:
        modrt.load(d, strategy="graph")
    assert not isinstance(e.value, modrt.InputError)
    with caplog.at_level("WARNING", logger="modrt"):
        model = modrt.load(d)
    assert model.choice == {"layer0": "host for batch 1+"}
    dropped = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("strategy graph dropped: failed to build: ValueError: unexpected node" in m for m in dropped), dropped
    assert any("strategy fused dropped" in m for m in dropped), dropped
    _equal_to_dense(model)


def test_a_strategy_that_declines_is_not_a_warning(lm_bundle, cache, caplog):
    with caplog.at_level("DEBUG", logger="modrt"):
        modrt.load(lm_bundle(modules=3, k=1), threads=1)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert any("fused declined" in r.getMessage() for r in caplog.records)


def test_recurrent_bundles_measure_the_loop_over_windows(lm_bundle, cache):
    d = lm_bundle(modules=5, k=2)
    model = modrt.load(d, threads=1)  # one thread: no "@N" variants, whatever the cores
    (path,) = cache.glob("*.json")
    us = json.loads(path.read_text())["measured"]["layer0"]["us_per_call"]
    assert set(us["1"]) == {"host", "graph", "graph-loop"}
    tok = np.random.default_rng(0).integers(0, 40, (64, 6))
    r, dense = model.run(tokens=tok), model.run_dense(tokens=tok)
    np.testing.assert_array_equal(r["modules"], dense["modules"])
    np.testing.assert_allclose(r["logits"], dense["logits"], rtol=1e-5, atol=1e-5)
    assert modrt.load(d, threads=1).choice == model.choice  # read back from the cache, graph-loop included


def test_composed_strategies_are_also_measured_on_the_other_thread_count(tmp_path, cache):
    """With several intra-op threads, auto measures graph and fused on one thread (what
    their small weights get) and on all of them; a threaded choice is cached, rebuilt and
    still equals the dense graph."""
    d = synthetic.build(tmp_path / "b", modules=6, k=2, dims=DIMS, seed=0)
    model = modrt.load(d, threads=2)
    (path,) = cache.glob("*.json")
    us = json.loads(path.read_text())["measured"]["layer0"]["us_per_call"]
    assert set(us["8"]) == {"host", "graph", "graph@2", "fused", "fused@2"}
    _equal_to_dense(model)
    record = json.loads(path.read_text())
    record["layers"]["layer0"] = [{"max_batch": 2, "strategy": "fused@2"}, {"max_batch": None, "strategy": "graph@2"}]
    path.write_text(json.dumps(record))
    again = modrt.load(d, threads=2)
    assert again.choice == {"layer0": "fused@2 for batch 1-2, graph@2 for batch 3+"}
    assert (again.strategy_for(1), again.strategy_for(5)) == ("fused", "graph")
    layers = again._routed["layer0"].layers
    assert {n: l.session.get_session_options().intra_op_num_threads for n, l in layers.items()} == {
        "fused@2": 2, "graph@2": 2}
    for batch in (1, 5, 64):
        x = np.random.default_rng(batch).standard_normal((batch, DIMS[0])).astype(np.float32)
        r, dense = again.run(x=x), again.run_dense(x=x)
        np.testing.assert_array_equal(r["modules"], dense["modules"])
        np.testing.assert_allclose(r["y"], dense["y"], rtol=1e-5, atol=1e-5)
    one = modrt.load(d, threads=1)  # one thread: nothing else to measure (another cache key)
    (other,) = set(cache.glob("*.json")) - {path}
    assert set(json.loads(other.read_text())["measured"]["layer0"]["us_per_call"]["8"]) == {"host", "graph", "fused"}
    _equal_to_dense(one)


def test_thread_suffixed_names():
    assert auto.split("fused") == ("fused", None) and auto.split("graph@4") == ("graph", 4)
    for bad in ("host@2", "fused@0", "fused@x", "graph-loop@2", "fused@"):
        assert not auto.buildable(bad)
        with pytest.raises(modrt.InputError, match="unknown"):
            auto.split(bad)
    assert all(auto.buildable(n) for n in ("host", "graph", "fused", "graph-loop", "fused@1", "graph@16"))
    assert not auto.buildable("warp")
