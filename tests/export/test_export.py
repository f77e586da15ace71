"""Export: every graph equals its PyTorch module; routed equals dense row for row."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

import modrt
from modrt import bundle
from modrt.evaluate import perplexity, split_ids
from modrt.export import graphs as G
from modrt.train import data as tdata
from modrt.train.checkpoint import load_model
from modrt.train.trainer import evaluate


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


METHODS = ["k1", "k3", "dense", "reinforce", "noisy"]
ROUTED = ["k1", "k3", "reinforce", "noisy"]


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("batch", [1, 7])
def test_every_graph_equals_its_pytorch_module(bundles, name, batch):
    ckpt, out = bundles[name]
    model, _ = load_model(ckpt)
    manifest = bundle.load(out)
    gen = torch.Generator().manual_seed(batch)
    for g in G.graph_defs(model):
        # Fresh inputs at another batch size than the export sample: dynamic axes work.
        args = tuple(
            torch.randint(0, model.cfg.vocab_size, (batch, 6), generator=gen) if a.dtype == torch.long
            else torch.randn((batch,) + tuple(a.shape[1:]), generator=gen)
            for a in g.args
        )
        with torch.no_grad():
            want = g.module(*args)
        want = want if isinstance(want, tuple) else (want,)
        got = _session(out / manifest.graphs[g.name].file).run(
            None, {n: a.numpy() for n, a in zip(g.inputs, args, strict=True)})
        for w, o in zip(want, got, strict=True):
            np.testing.assert_allclose(o, w.numpy(), rtol=1e-5, atol=1e-5, err_msg=g.name)


@pytest.mark.parametrize("name", METHODS)
def test_manifest_records_parity_and_checksums(bundles, name):
    _, out = bundles[name]
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["format"] == "modrt-bundle" and raw["opset"] == G.OPSET
    p = raw["parity"]
    assert p["ppl_rel_diff_routed"] < 1e-3 and p["ppl_rel_diff_dense"] < 1e-3
    assert p["logits_max_abs_diff_routed"] < 1e-3
    assert p["routing_agreement"] == 1.0
    for g in raw["graphs"].values():
        assert bundle.sha256_file(out / g["file"]) == g["sha256"]
        assert all(t["shape"][0] == -1 for t in g["inputs"] + g["outputs"]), g["file"]


@pytest.mark.parametrize("name", ROUTED)
def test_routed_equals_dense_on_real_and_random_input(bundles, corpus, name):
    _, out = bundles[name]
    rt = modrt.load(out, provider="cpu")
    rng = np.random.default_rng(0)
    real = corpus.valid[:9 * 12].reshape(9, 12)  # (B, T) real text
    rand = rng.integers(0, len(corpus.vocab), size=(5, 8))
    for tokens in (real, rand, real[:1]):
        r, d = rt.run(tokens=tokens), rt.run_dense(tokens=tokens)
        np.testing.assert_array_equal(r["modules"], d["modules"])
        np.testing.assert_allclose(r["logits"], d["logits"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r["h_last"], d["h_last"], rtol=1e-5, atol=1e-5)
        assert r["modules"].shape == tokens.shape + (1, rt.manifest.layers[0].k)


def _controller_biased_to(ckpt, module: int | None, tmp_path, ptb_dir):
    """Re-export a checkpoint whose controller sends every row to ``module`` (None: rows
    spread over few modules), so batches where one module gets every row and where most
    modules get none are exercised."""
    from modrt.export.exporter import export
    from modrt.train import checkpoint

    state = checkpoint.load(ckpt)
    w = state["model"]["layer.controller.weight"]
    b = state["model"]["layer.controller.bias"]
    M = state["model_config"]["modules"]
    K = 1 if state["model_config"]["method"] == "noisy-topk" else state["model_config"]["k"]  # softmaxes
    if module is not None:
        w.zero_()
        b.copy_(torch.full((K, M), -10.0).index_fill_(1, torch.tensor([module]), 10.0).flatten())
    else:
        b.copy_(torch.full((K, M), -30.0).index_fill_(1, torch.tensor([0, 1]), 0.0).flatten())
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, {k: v for k, v in state.items() if k not in ("format", "version", "modrt_version")})
    export(path, tmp_path / "bundle", progress=False, data=ptb_dir, parity_tokens=400)
    return tmp_path / "bundle"


@pytest.mark.parametrize("name", ROUTED)
@pytest.mark.parametrize("module", [3, None])
def test_routed_equals_dense_when_modules_get_no_rows_or_all_rows(bundles, corpus, name, module, tmp_path,
                                                                  ptb_dir):
    ckpt, _ = bundles[name]
    out = _controller_biased_to(ckpt, module, tmp_path, ptb_dir)
    rt = modrt.load(out, provider="cpu")
    tokens = corpus.test[: 6 * 10].reshape(6, 10)
    r, d = rt.run(tokens=tokens), rt.run_dense(tokens=tokens)
    used = np.unique(r["modules"])
    if module is not None and name == "noisy":  # top-2 of one distribution: 3, then the tie's lowest id
        assert (r["modules"][..., 0] == module).all() and used.tolist() == [0, module]
    elif module is not None:
        assert used.tolist() == [module]  # one module gets every row
    else:
        assert set(used.tolist()) <= {0, 1}  # the other modules get none
    np.testing.assert_array_equal(r["modules"], d["modules"])
    np.testing.assert_allclose(r["logits"], d["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_bundle_eval_perplexity_equals_pytorch(bundles, corpus, name, ptb_dir):
    ckpt, out = bundles[name]
    model, _ = load_model(ckpt)
    tokens = corpus.test[:3000]
    nll_torch, _ = evaluate(model, tdata.batchify(tokens, 10), 35, torch.device("cpu"))
    rt = modrt.load(out, provider="cpu")
    ids = split_ids(rt.manifest, "test", ptb_dir)[:3000]
    np.testing.assert_array_equal(ids, tokens)
    res = perplexity(rt, ids, batch=10, bptt=35)
    assert abs(res["ppl"] - np.exp(nll_torch)) / np.exp(nll_torch) < 1e-3
    dense = perplexity(rt, ids, batch=10, bptt=35, dense=True)
    assert abs(dense["ppl"] - res["ppl"]) / res["ppl"] < 1e-4


def test_export_cli_errors_are_one_line(bundles, tmp_path):
    ckpt, out = bundles["k1"]
    cases = [
        (["export", str(ckpt), str(out)], "not empty"),  # existing bundle, no --force
        (["export", str(tmp_path / "nope.pt"), str(tmp_path / "o")], "no such checkpoint"),
    ]
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    cases.append((["export", str(junk), str(tmp_path / "o2")], "not a modrt checkpoint (not a PyTorch file"))
    import torch

    foreign = tmp_path / "foreign.pt"  # a PyTorch file the safe unpickler refuses: its own line, whole
    torch.save({"f": print}, foreign)
    cases.append((["export", str(foreign), str(tmp_path / "o3")],
                  "not a modrt checkpoint (WeightsUnpickler error: Unsupported global: GLOBAL print"))
    for args, needle in cases:
        p = subprocess.run([sys.executable, "-m", "modrt", *args], capture_output=True, text=True)
        assert p.returncode == 1, (args, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], p.stderr
        assert "Traceback" not in p.stderr
        assert lines[0].endswith((")", "...)")) or "not empty" in lines[0] or "no such" in lines[0], lines[0]


def test_noisy_topk_manifest_records_its_rules(bundles):
    _, out = bundles["noisy"]
    layer = bundle.load(out).layers[0]
    assert (layer.selection, layer.combine, layer.k) == ("topk", "gate", 2)
    assert bundle.load(bundles["reinforce"][1]).layers[0].selection == "slots"
    ctrl = bundle.load(out).graphs[layer.controller].outputs[0]
    assert list(ctrl.shape) == [-1, 1, 6]  # one distribution over the 6 modules


def test_bench_torch_peer_from_the_checkpoint_of_a_ptb_bundle(bundles):
    """``modrt bench OUT/ --checkpoint CKPT``: PyTorch eager on the trained LM, measured
    beside routed and dense (the peer is checked against the routed logits first)."""
    from modrt.bench.report import run
    from modrt.bench.timing import BenchConfig

    ckpt, out = bundles["k1"]
    rep = run(out, BenchConfig(batches=(2,), seq=5, seconds=0.05, block=0.02, inputs=2, warmup=1, min_iters=2,
                               threads=1, provider="cpu"), progress=False, checkpoint=ckpt)
    assert "torch" not in rep["config"]["skipped"] and rep["results"][0]["torch"]["p50_us"] > 0
    assert "ort_moe" in rep["config"]["skipped"]
